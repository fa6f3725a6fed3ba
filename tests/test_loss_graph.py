"""Server-side custom losses: the SDK's create_custom_loss traces a loss, uploads the graph, and forward_backward_custom
runs it on the worker in one pass; it equals the same traced loss run client-side, and nothing outside our allow-list
runs. Units first (the check and the rebuilt graph, no stack), then the real stack through the official SDK.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import numpy as np
import pytest
import requests
import tinker
import torch
import torch.nn.functional as F
from tinker import types
from tinker.lib.public_interfaces.custom_loss import encode_graph, run_loss_handle, trace_loss

from client import TinkerbellClient, UserInputError
from core import loss_graph
from core.errors import UserError
from losses.graph import FUNCTIONS, GraphLoss
from tests.stackutil import TINY_MODEL
from tests.test_hostile import WRONG as HOSTILE_VALUES
from tests.test_hostile import _field_paths, _replaced

os.environ["TINKER_TELEMETRY"] = "0"
# Adam's eps as the team's numeric tests use it: 1e-5 keeps float noise on near-zero gradients from becoming steps.
ADAM = types.AdamParams(learning_rate=1e-2, eps=1e-5)


def dpo(logprobs, ref_logprobs, chosen, rejected):
    """DPO on one datum holding a chosen and a rejected response; the masks say which tokens are which."""
    policy = (logprobs - ref_logprobs) * chosen - (logprobs - ref_logprobs) * rejected
    margin = policy.sum()
    loss = -F.logsigmoid(0.5 * margin)
    return loss, {"custom/margin:mean": margin.detach(), "custom/accuracy:mean": (margin > 0).float()}


def kl_penalised(logprobs, sampling_logprobs, advantages, mask):
    """Importance-weighted policy gradient with a k3 KL penalty towards the sampler."""
    log_ratio = logprobs - sampling_logprobs
    ratio = torch.exp(log_ratio)
    kl = ((ratio - 1) - log_ratio) * mask
    loss = -(ratio * advantages * mask).sum() + 0.1 * kl.sum()
    return loss, {"custom/kl:sum": kl.sum(), "custom/ratio:mean": (ratio * mask).sum() / mask.sum()}


RANKS = {
    dpo: {"logprobs": 1, "ref_logprobs": 1, "chosen": 1, "rejected": 1},
    kl_penalised: {"logprobs": 1, "sampling_logprobs": 1, "advantages": 1, "mask": 1},
}


def uploaded(fn) -> tuple[object, dict]:
    """The SDK's own trace of fn and the checked upload it would send."""
    handle = trace_loss(fn, RANKS[fn], "session")
    spec = loss_graph.check_upload(
        handle.name,
        [i.model_dump() for i in handle.inputs],
        encode_graph(handle).model_dump(mode="json"),
        max_nodes=1000,
    )
    return handle, spec


def loss_inputs(fn, length: int, seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    if fn is dpo:
        chosen = np.zeros(length, dtype=np.float32)
        rejected = np.zeros(length, dtype=np.float32)
        chosen[2 : length // 2], rejected[length // 2 + 1 :] = 1.0, 1.0
        values = {"ref_logprobs": rng.normal(-6.0, 0.5, length), "chosen": chosen, "rejected": rejected}
    else:
        values = {
            "sampling_logprobs": rng.normal(-6.0, 0.3, length),
            "advantages": rng.normal(0.0, 1.0, length),
            "mask": (np.arange(length) >= 3).astype(np.float32),
        }
    return {k: torch.tensor(np.asarray(v, dtype=np.float32)) for k, v in values.items()}


# ---- the check and the rebuilt graph ---------------------------------------------------------------------------


def test_every_allowed_function_is_named_as_torch_fx_names_it():
    """The SDK names call targets with torch.fx's qualified name; a name that drifted would refuse a good loss."""
    from torch.fx.node import _get_qualified_name

    for name, fn in FUNCTIONS.items():
        assert _get_qualified_name(fn).replace("_operator.", "operator.", 1) == name
    assert all(hasattr(torch.Tensor, method) for method in loss_graph.METHODS)


@pytest.mark.parametrize("fn", [dpo, kl_penalised], ids=["dpo", "kl_penalised"])
def test_rebuilt_graph_equals_the_sdk_running_its_own_trace(fn):
    handle, spec = uploaded(fn)
    loss = GraphLoss(spec)
    lengths = [9, 14, 11]
    inputs = [loss_inputs(fn, n, seed) for seed, n in enumerate(lengths)]
    ours = [torch.randn(n, generator=torch.Generator().manual_seed(n)).sub(6).requires_grad_() for n in lengths]
    theirs = [lp.detach().clone().requires_grad_() for lp in ours]
    data = [
        tinker.Datum(
            model_input=tinker.ModelInput.from_ints([1] * len(lp)),
            loss_fn_inputs={k: tinker.TensorData.from_torch(v) for k, v in x.items()},
        )
        for lp, x in zip(ours, inputs)
    ]
    got, got_metrics = loss(ours, inputs, {})
    want, want_metrics = run_loss_handle(handle, data, theirs)
    got.backward()
    want.backward()
    assert got.item() == want.item() and got_metrics == want_metrics
    for a, b in zip(ours, theirs):
        assert torch.equal(a.grad, b.grad)


def test_a_rank_two_loss_runs_on_top_k_logprobs_like_the_sdk():
    def top_k_distill(logprobs, teacher_probs):  # logprobs (T, K): the targets' top-K columns
        loss = -(teacher_probs * logprobs).sum(dim=-1).mean()
        return loss, {"custom/teacher_mass:mean": teacher_probs.sum() / teacher_probs.shape[0]}

    handle = trace_loss(top_k_distill, {"logprobs": 2, "teacher_probs": 2}, "session")
    upload = encode_graph(handle).model_dump(mode="json")
    loss = GraphLoss(loss_graph.check_upload(handle.name, [i.model_dump() for i in handle.inputs], upload, 100))
    ours = [torch.randn(n, 3).log_softmax(-1).requires_grad_() for n in (5, 8)]
    theirs = [lp.detach().clone().requires_grad_() for lp in ours]
    teacher = [torch.rand(n, 3).softmax(-1) for n in (5, 8)]
    data = [
        tinker.Datum(
            model_input=tinker.ModelInput.from_ints([1] * len(t)),
            loss_fn_inputs={"teacher_probs": tinker.TensorData.from_torch(t)},
        )
        for t in teacher
    ]
    got, got_metrics = loss(ours, [{"teacher_probs": t} for t in teacher], {})
    want, want_metrics = run_loss_handle(handle, data, theirs)
    got.backward()
    want.backward()
    assert got.item() == want.item() and got_metrics == want_metrics
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs))


def _node(op: str, name: str, target: str, *args, **kwargs) -> dict:
    return {"op": op, "name": name, "target": target, "args": list(args), "kwargs": kwargs}


def _graph(*middle: dict, loss: str = "out") -> dict:
    nodes = [_node("placeholder", "logprobs", "logprobs"), *middle]
    nodes.append(_node("output", "output", "output", {"tuple": [{"ref": loss}, {"dict": {}}]}))
    return {"format": 1, "nodes": nodes}


LOGPROBS = [{"name": "logprobs", "rank": 1}]


@pytest.mark.parametrize(
    ("graph", "inputs", "message"),
    [
        (
            _graph(_node("call_function", "out", "builtins.eval", "1")),
            LOGPROBS,
            "nodes[1] (out): calls 'builtins.eval'",
        ),
        (_graph(_node("call_function", "out", "torch.load", "f")), LOGPROBS, "nodes[1] (out): calls 'torch.load'"),
        (_graph(_node("call_function", "out", "torch.zeros", 10**9)), LOGPROBS, "nodes[1] (out): calls 'torch.zeros'"),
        (_graph(_node("call_method", "out", "add_", {"ref": "logprobs"}, 1.0)), LOGPROBS, "calls method 'add_'"),
        (_graph(_node("call_method", "out", "backward", {"ref": "logprobs"})), LOGPROBS, "calls method 'backward'"),
        (_graph(_node("call_module", "out", "linear", {"ref": "logprobs"})), LOGPROBS, "op 'call_module'"),
        (_graph(_node("get_attr", "out", "weight")), LOGPROBS, "(out): op 'get_attr' reads a captured tensor"),
        (
            _graph(_node("call_function", "out", "getattr", {"ref": "logprobs"}, "__class__")),
            LOGPROBS,
            "(out): reads attribute '__class__'",
        ),
        (_graph(_node("call_method", "out", "sum", {"ref": "later"})), LOGPROBS, "refers to 'later'"),
        (
            _graph(_node("call_method", "out", "to", {"ref": "logprobs"}, {"device": "cuda:1"})),
            LOGPROBS,
            "a device argument",
        ),
        (
            _graph(_node("call_method", "out", "sum", {"ref": "logprobs"})),
            [{"name": "logprobs", "rank": 3}],
            "inputs[0].rank: must be 0, 1 or 2",
        ),
        (
            _graph(_node("call_method", "out", "sum", {"ref": "logprobs"})),
            [*LOGPROBS, {"name": "beta", "rank": 0}],
            "inputs[1].rank: beta is declared rank 0",
        ),
        (
            _graph(*[_node("call_method", f"n{i}", "neg", {"ref": "logprobs"}) for i in range(5)], loss="n4"),
            LOGPROBS,
            "7 nodes is more than the limit of 5",
        ),
    ],
    ids=[
        "eval",
        "torch.load",
        "size-taking constructor",
        "in-place method",
        "backward",
        "module",
        "captured tensor",
        "dunder attribute",
        "forward reference",
        "device",
        "rank 3",
        "rank 0",
        "too many nodes",
    ],
)
def test_anything_outside_the_allow_list_is_a_user_error_naming_the_node(graph, inputs, message):
    with pytest.raises(UserError, match=None) as caught:
        loss_graph.check_upload("bad", inputs, graph, max_nodes=5)
    assert message in str(caught.value)


def test_a_node_that_blows_up_a_tensor_or_a_wrong_rank_input_fails_naming_it():
    outer = _graph(
        _node(
            "call_function",
            "column",
            "operator.getitem",
            {"ref": "logprobs"},
            {"tuple": [{"slice": [None, None, None]}, None]},
        ),
        _node("call_function", "square", "operator.mul", {"ref": "column"}, {"ref": "logprobs"}),
        _node("call_method", "out", "sum", {"ref": "square"}),
    )
    loss = GraphLoss(loss_graph.check_upload("outer", LOGPROBS, outer, max_nodes=10))
    small = torch.zeros(100)
    assert loss([small], [{}], {})[0].item() == 0.0  # 100 x 100 is inside the budget
    with pytest.raises(UserError, match=r"node square made a tensor of shape \(300, 300\)"):
        loss([torch.zeros(300)], [{}], {})
    _, spec = uploaded(dpo)
    inputs = loss_inputs(dpo, 6, 0)
    inputs["chosen"] = inputs["chosen"][:, None]
    with pytest.raises(UserError, match=r"loss_fn_inputs\[0\].chosen: rank 2 .* declared chosen with rank 1"):
        GraphLoss(spec)([torch.zeros(6)], [inputs], {})
    with pytest.raises(UserError, match=r"loss_fn_inputs\[0\].ref_logprobs: required by custom loss 'dpo'"):
        GraphLoss(spec)([torch.zeros(6)], [{"chosen": inputs["rejected"]}], {})


def test_a_worker_refuses_a_graph_loss_named_directly_instead_of_through_the_api():
    from core.settings import Settings
    from losses import register_loss, unregister_loss
    from tasks.custom_losses import resolve_loss_fn

    _, spec = uploaded(dpo)
    register_loss("graph/someone/abc", GraphLoss(spec), replace=True)
    try:
        with pytest.raises(UserError, match="unknown loss 'graph/someone/abc'"):
            resolve_loss_fn("graph/someone/abc", None, Settings(), redis=None)
    finally:
        unregister_loss("graph/someone/abc")


# ---- through the official SDK, on a real stack ---------------------------------------------------------------


@pytest.fixture(scope="module")
def graph_stack(make_stack):
    stack = make_stack(1, {"TINKERBELL_AUTH": "on"})
    registry = stack.registry()
    keys = {"alice": registry.create_key("alice"), "bob": registry.create_key("bob")}
    clients = {name: tinker.ServiceClient(base_url=stack.url, api_key=key) for name, key in keys.items()}
    yield stack, keys, clients
    for client in clients.values():
        client.close("success").result(timeout=30)


def sdk_batch(fn, seeds: list[int]) -> list[tinker.Datum]:
    batch = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        length = 10 + seed % 4
        tokens = rng.integers(1, 300, size=length + 1).tolist()
        inputs = {k: tinker.TensorData.from_torch(v) for k, v in loss_inputs(fn, length, seed).items()}
        batch.append(
            tinker.Datum(
                model_input=tinker.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], **inputs},
            )
        )
    return batch


def adapter_weights(stack, path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    model_id, kind, name = path.removeprefix("tinker://").split("/")
    return load_file(str(stack.data_dir / "checkpoints" / model_id / kind / name / "adapter_model.safetensors"))


def next_seq(stack, model_id: str) -> int:
    return int(stack.registry().redis.get(f"tb:seq:{model_id}:next"))


@pytest.mark.parametrize("fn", [dpo, kl_penalised], ids=["dpo", "kl_penalised"])
def test_server_side_loss_equals_the_same_loss_run_client_side(graph_stack, fn):
    stack, _, clients = graph_stack
    service = clients["alice"]
    handle = service.create_custom_loss(fn, RANKS[fn]).result(timeout=60)
    assert handle.loss_id.startswith("graph:")
    on_server = service.create_lora_training_client(TINY_MODEL, rank=4, seed=5).result(timeout=120)
    on_client = service.create_lora_training_client(TINY_MODEL, rank=4, seed=5).result(timeout=120)
    batch = sdk_batch(fn, [1, 2, 3])

    # One at a time: a pass alone computes the same numbers as the other path's passes alone.
    server = on_server.forward_backward_custom(batch, handle).result(timeout=60)
    on_server.optim_step(ADAM).result(timeout=60)
    client = on_client.forward_backward_custom(batch, dataclasses.replace(handle, loss_id=None)).result(timeout=60)
    on_client.optim_step(ADAM).result(timeout=60)

    assert server.metrics["loss:sum"] == client.metrics["loss:sum"]
    custom = {k: v for k, v in client.metrics.items() if k.startswith("custom/")}
    assert custom and {k: server.metrics[k] for k in custom} == pytest.approx(custom, rel=1e-6, abs=1e-6)
    for got, want in zip(server.loss_fn_outputs, client.loss_fn_outputs):
        assert np.array_equal(got["logprobs"].to_numpy(), want["logprobs"].to_numpy())
    # One forward_backward on the server instead of a forward and a backward: seq_ids 1 and 2, against 1, 2 and 3.
    assert (next_seq(stack, on_server.model_id), next_seq(stack, on_client.model_id)) == (3, 4)

    server_weights = adapter_weights(stack, on_server.save_weights_for_sampler("after").result(timeout=60).path)
    client_weights = adapter_weights(stack, on_client.save_weights_for_sampler("after").result(timeout=60).path)
    assert server_weights.keys() == client_weights.keys() and server_weights
    start = adapter_weights(
        stack,
        service.create_lora_training_client(TINY_MODEL, rank=4, seed=5)
        .result(timeout=120)
        .save_weights_for_sampler("start")
        .result(timeout=60)
        .path,
    )
    moved = max(np.abs(server_weights[k] - start[k]).max() for k in start)
    assert moved > 1e-3  # the step did something worth comparing
    # The same ops on the same numbers in the same order (the backward of sum(-lp * -g) hands the model exactly g,
    # the gradient the graph's own backward gives), so the weights agree bit for bit, well inside 1e-6.
    for name in server_weights:
        assert np.array_equal(server_weights[name], client_weights[name]), name


def test_another_key_can_neither_use_nor_read_a_loss_id(graph_stack):
    stack, keys, clients = graph_stack
    handle = (
        clients["alice"]
        .create_custom_loss(lambda logprobs, mask: ((-logprobs * mask).sum(), {}), {"logprobs": 1, "mask": 1})
        .result(timeout=60)
    )
    own = requests.get(f"{stack.url}/api/v1/loss_graphs/{handle.loss_id}", headers={"X-API-Key": keys["alice"]})
    assert own.status_code == 200 and own.json()["name"] == "<lambda>" and own.json()["graph"]["nodes"]
    other = requests.get(f"{stack.url}/api/v1/loss_graphs/{handle.loss_id}", headers={"X-API-Key": keys["bob"]})
    assert other.status_code == 404 and handle.loss_id in other.json()["error"]

    bob = clients["bob"].create_lora_training_client(TINY_MODEL, rank=4, seed=0).result(timeout=120)
    datum = tinker.Datum(
        model_input=tinker.ModelInput.from_ints([1, 2, 3, 4]),
        loss_fn_inputs={"target_tokens": [2, 3, 4, 5], "mask": tinker.TensorData.from_torch(torch.ones(4))},
    )
    with pytest.raises(tinker.BadRequestError, match=r"loss_fn_config.loss_id: you have no custom loss 'graph:"):
        bob.forward_backward([datum], "custom", {"loss_id": handle.loss_id}).result(timeout=60)
    # bob's request was refused at the door and used up its seq_id: his next one still runs
    assert np.isfinite(bob.forward_backward([datum], "cross_entropy").result(timeout=60).metrics["loss:sum"])
    # nor can he name the worker's registry entry for alice's graph as a plain loss
    native = TinkerbellClient(stack.url, api_key=keys["bob"])
    model_id = native.add_lora(rank=4, seed=0).result(120)["model_id"]
    owner = stack.registry().lookup_key(keys["alice"])["key_id"]
    registry_name = f"graph/{owner}/{handle.loss_id.removeprefix('graph:')}"
    plain = {"model_input": [1, 2, 3, 4], "loss_fn_inputs": {"target_tokens": [2, 3, 4, 5], "mask": [1.0] * 4}}
    with pytest.raises(UserInputError, match="unknown loss"):
        native.forward_backward(model_id, [plain], loss_fn=registry_name).result(60)


def test_a_graph_naming_an_op_outside_the_allow_list_is_refused_at_upload(graph_stack):
    stack, keys, clients = graph_stack

    def makes_a_tensor(logprobs):  # torch.zeros takes a size: the SDK allows it, this server does not
        return (logprobs + torch.zeros(logprobs.shape)).sum(), {}

    with pytest.raises(tinker.BadRequestError, match=r"graph.nodes\[2\] \(zeros\): calls 'torch.zeros'"):
        clients["alice"].create_custom_loss(makes_a_tensor, {"logprobs": 1}).result(timeout=60)

    session_id = clients["alice"].holder.get_session_id()
    handle = trace_loss(dpo, RANKS[dpo], session_id)
    graph = encode_graph(handle).model_dump(mode="json")
    evil = copy.deepcopy(graph)
    evil["nodes"][5]["target"] = "os.system"  # what a hand-made client could send; the SDK would refuse it
    body = {
        "session_id": session_id,
        "custom_loss_seq_id": 99,
        "name": "dpo",
        "inputs": [i.model_dump() for i in handle.inputs],
        "graph": evil,
        "type": "create_custom_loss",
    }
    refused = requests.post(f"{stack.url}/api/v1/create_custom_loss", json=body, headers={"X-API-Key": keys["alice"]})
    assert refused.status_code == 400
    assert refused.json()["error"].startswith(f"graph.nodes[5] ({graph['nodes'][5]['name']}): calls 'os.system'")
    body["session_id"] = clients["bob"].holder.get_session_id()  # bob's session is not alice's to upload into
    body["graph"] = graph
    other = requests.post(f"{stack.url}/api/v1/create_custom_loss", json=body, headers={"X-API-Key": keys["alice"]})
    assert other.status_code == 404


WRONG = [*HOSTILE_VALUES, {"ref": []}, {"tuple": {}}, {"slice": [[], 1, 2]}]


def test_an_upload_is_idempotent_and_no_malformed_one_is_a_server_error(graph_stack):
    stack, keys, clients = graph_stack
    session_id = clients["alice"].holder.get_session_id()

    def masked_sum(logprobs, mask):
        return (logprobs * mask).sum().neg(), {"custom/tokens:sum": mask.sum()}

    handle = trace_loss(masked_sum, {"logprobs": 1, "mask": 1}, session_id)
    body = {
        "session_id": session_id,
        "custom_loss_seq_id": 7,
        "name": handle.name,
        "inputs": [i.model_dump() for i in handle.inputs],
        "graph": encode_graph(handle).model_dump(mode="json"),
        "type": "create_custom_loss",
    }
    http = requests.Session()
    http.headers["X-API-Key"] = keys["alice"]

    def loss_id() -> str:
        future = http.post(f"{stack.url}/api/v1/create_custom_loss", json=body, timeout=30).json()
        return http.post(f"{stack.url}/api/v1/retrieve_future", json=future, timeout=30).json()["loss_id"]

    assert loss_id() == loss_id()  # the SDK retries uploads; a re-send stores nothing new
    server_errors = []
    for path in list(_field_paths(body))[1:]:
        for value in WRONG:
            answer = http.post(
                f"{stack.url}/api/v1/create_custom_loss",
                data=json.dumps(_replaced(body, path, value)),
                headers={"Content-Type": "application/json"},
                timeout=30,
            )
            if answer.status_code >= 500:
                server_errors.append((path, value, answer.text[:120]))
    assert not server_errors, sorted({(str(p[-1]), text) for p, _, text in server_errors})[:10]
