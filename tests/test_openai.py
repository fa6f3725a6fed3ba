"""The `openai` Python client pointed at Tinkerbell (/v1) chats with a fine-tuned adapter and with the base model:
the same tokens as the Tinker SDK's sample route, the model's own chat template, and per-key isolation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import openai
import psutil
import pytest
import tinker
from tinker import types
from transformers import AutoTokenizer

from tests.stackutil import ROOT, TINY_MODEL

os.environ["TINKER_TELEMETRY"] = "0"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER = " Paris is the capital."
GREEDY = types.SamplingParams(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def deployment(make_stack):
    """Auth on; alice trains an adapter to answer QUESTION with ANSWER and saves it for sampling."""
    stack = make_stack(1, {"TINKERBELL_AUTH": "on"})
    registry = stack.registry()
    alice_key, bob_key = registry.create_key("alice"), registry.create_key("bob")
    tokenizer = AutoTokenizer.from_pretrained(str(stack.models_dir / TINY_MODEL))
    prompt = list(tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)["input_ids"])
    answer = tokenizer.encode(ANSWER, add_special_tokens=False) + [tokenizer.eos_token_id]
    alice = tinker.ServiceClient(base_url=stack.url, api_key=alice_key)
    training = alice.create_lora_training_client(TINY_MODEL, rank=8, seed=0).result(timeout=120)
    full = prompt + answer
    datum = tinker.Datum(
        model_input=tinker.ModelInput.from_ints(full[:-1]),
        loss_fn_inputs={
            "target_tokens": full[1:],
            "weights": [0.0] * (len(prompt) - 1) + [1.0] * len(answer),
        },
    )
    for _ in range(50):  # the loss falls below 0.05 by about step 35
        training.forward_backward([datum], "cross_entropy").result(timeout=60)
        training.optim_step(types.AdamParams(learning_rate=2e-2)).result(timeout=60)
    path = training.save_weights_for_sampler("chat").result(timeout=60).path
    yield {
        "stack": stack,
        "alice": alice,
        "path": path,
        "prompt": prompt,
        "answer": answer,
        "tokenizer": tokenizer,
        "openai": openai.OpenAI(base_url=stack.url + "/v1", api_key=alice_key, max_retries=0),
        "bob": openai.OpenAI(base_url=stack.url + "/v1", api_key=bob_key, max_retries=0),
    }
    alice.close("success").result(timeout=30)


def sdk_greedy(deployment, model_path: str | None, prompt: list[int]) -> list[int]:
    """What the Tinker SDK's own sample route answers, greedy."""
    alice = deployment["alice"]
    if model_path:
        sampler = alice.create_sampling_client(model_path=model_path).result()
    else:
        sampler = alice.create_sampling_client(base_model=TINY_MODEL).result()
    result = sampler.sample(tinker.ModelInput.from_ints(prompt), num_samples=1, sampling_params=GREEDY)
    return list(result.result(timeout=60).sequences[0].tokens)


def visible(deployment, tokens: list[int]) -> str:
    return deployment["tokenizer"].decode(tokens, skip_special_tokens=True)


def test_chat_with_the_fine_tuned_adapter_answers_what_it_was_taught_and_equals_the_sdk(deployment):
    want = sdk_greedy(deployment, deployment["path"], deployment["prompt"])
    assert want == deployment["answer"]  # the adapter learned its answer, end token included
    reply = deployment["openai"].chat.completions.create(
        model=deployment["path"], messages=QUESTION, max_tokens=GREEDY.max_tokens, temperature=0
    )
    [choice] = reply.choices
    assert choice.message.role == "assistant" and choice.message.content == ANSWER
    assert choice.finish_reason == "stop"
    assert reply.usage.prompt_tokens == len(deployment["prompt"])  # transformers' own chat template, same ids
    assert reply.usage.completion_tokens == len(want)
    assert reply.model == deployment["path"] and reply.object == "chat.completion"


def test_streamed_chat_is_the_same_text_in_chunks_then_done(deployment):
    stream = deployment["openai"].chat.completions.create(
        model=deployment["path"],
        messages=QUESTION,
        max_tokens=GREEDY.max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == ANSWER and len(pieces) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.completion_tokens == len(deployment["answer"])


def test_completions_on_the_base_model_and_the_adapter_equal_the_sdk_tokens(deployment):
    text = "The quick brown fox"
    prompt = deployment["tokenizer"](text)["input_ids"]
    for model, path in ((TINY_MODEL, None), (deployment["path"], deployment["path"])):
        want = sdk_greedy(deployment, path, prompt)
        got = deployment["openai"].completions.create(model=model, prompt=text, max_tokens=12, temperature=0)
        assert got.choices[0].text == visible(deployment, want), model
        assert got.usage.prompt_tokens == len(prompt) and got.usage.completion_tokens == len(want)
        assert got.choices[0].finish_reason == ("length" if len(want) == 12 else "stop")
        streamed = deployment["openai"].completions.create(
            model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True
        )
        assert "".join(c.choices[0].text for c in streamed) == visible(deployment, want)


def test_a_stop_string_cuts_the_text_before_it(deployment):
    reply = deployment["openai"].chat.completions.create(
        model=deployment["path"], messages=QUESTION, max_tokens=12, temperature=0, stop=[" capital"]
    )
    assert reply.choices[0].message.content == " Paris is the"
    assert reply.choices[0].finish_reason == "stop"


def test_n_seeded_samples_repeat_with_the_same_seed(deployment):
    def ask():
        reply = deployment["openai"].completions.create(
            model=TINY_MODEL, prompt="Once upon", max_tokens=6, temperature=1.0, top_p=0.9, n=3, seed=7
        )
        return [c.text for c in reply.choices]

    first = ask()
    assert len(first) == 3 and ask() == first


def test_another_key_cannot_reach_the_adapter(deployment):
    with pytest.raises(openai.NotFoundError) as caught:
        deployment["bob"].chat.completions.create(model=deployment["path"], messages=QUESTION, max_tokens=4)
    assert caught.value.body["code"] == "model_not_found" and deployment["path"] in caught.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        deployment["bob"].completions.create(model=deployment["path"], prompt="hi", max_tokens=4)


def test_errors_have_the_openai_shape(deployment):
    stack = deployment["stack"]
    with pytest.raises(openai.AuthenticationError) as caught:
        openai.OpenAI(base_url=stack.url + "/v1", api_key="tml-unknown", max_retries=0).completions.create(
            model=TINY_MODEL, prompt="hi"
        )
    assert caught.value.body["type"] == "authentication_error"
    with pytest.raises(openai.NotFoundError):
        deployment["openai"].completions.create(model="nobody/no-model", prompt="hi")
    with pytest.raises(openai.BadRequestError) as caught:
        deployment["openai"].completions.create(model=TINY_MODEL, prompt="hi", temperature=-1)
    assert caught.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as caught:
        deployment["openai"].chat.completions.create(model=TINY_MODEL, messages=QUESTION, logprobs=True)
    assert caught.value.body["param"] == "logprobs"


def test_the_api_process_never_loads_torch_while_serving_openai(deployment):
    """DESIGN rule 1 holds after chat: the tokenizer and template are read without transformers."""
    deployment["openai"].chat.completions.create(model=TINY_MODEL, messages=QUESTION, max_tokens=2)

    def loads_torch(process: psutil.Process) -> bool:
        return any("libtorch" in m.path for m in process.memory_maps())

    assert loads_torch(psutil.Process(deployment["stack"].procs["worker-w0"].pid))  # the probe sees it where it is
    api = psutil.Process(deployment["stack"].procs["api"].pid)
    for process in [api, *api.children(recursive=True)]:
        assert not loads_torch(process), process.cmdline()


def test_models_lists_the_served_base_models(deployment):
    assert TINY_MODEL in [m.id for m in deployment["openai"].models.list()]


# ---- the real default model: the packaged GGUF's tokenizer, extracted without torch in the API process ---------
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
EXTRACT = """
import json, sys
from api.text_tokenizer import text_tokenizer
from core.settings import Settings
tokenizer = text_tokenizer(sys.argv[1], Settings(data_dir=sys.argv[2], models_dir=""))
ids = tokenizer.apply_chat_template(json.loads(sys.argv[3]))
print(json.dumps({"ids": ids, "torch": "torch" in sys.modules or "transformers" in sys.modules}))
"""


def test_a_packaged_models_tokenizer_is_extracted_in_a_child_and_matches_transformers(tmp_path):
    from tests.tiny_model import smollm2_tokenizer_dir

    run = subprocess.run(
        [sys.executable, "-c", EXTRACT, SMOL, str(tmp_path), json.dumps(QUESTION)],
        check=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(run.stdout.strip().splitlines()[-1])
    want = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir())).apply_chat_template(
        QUESTION, add_generation_prompt=True, tokenize=True
    )["input_ids"]
    assert report == {"ids": list(want), "torch": False}


@pytest.mark.smollm2
def test_the_openai_client_asks_smollm2_the_capital_of_france(make_stack):
    stack = make_stack(1, {"TINKERBELL_AUTH": "off"}, base_model=SMOL)
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="tml-x", max_retries=0)
    reply = client.chat.completions.create(model=SMOL, messages=QUESTION, max_tokens=12, temperature=0)
    assert "Paris" in reply.choices[0].message.content
