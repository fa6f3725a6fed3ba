"""Development server: `python -m api` (production uses gunicorn, see api/gunicorn_conf.py)."""

from api import create_app
from core.settings import Settings

if __name__ == "__main__":
    settings = Settings.from_env()
    create_app(settings).run(host=settings.host, port=settings.port, threaded=True)
