"""Run the Kallglot emulator under gevent: ``python -m app.devtools.emulator --host 127.0.0.1 --port 8765``."""
from gevent import monkey

monkey.patch_all()  # before anything else imports socket, ssl or threading

import argparse  # noqa: E402
import sys  # noqa: E402

from gevent.pywsgi import WSGIServer  # noqa: E402

from app.devtools.emulator import create_emulator_app  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and serve the emulator until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m app.devtools.emulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--api-key", help="overrides KALLGLOT_EMULATOR_API_KEY")
    parser.add_argument("--public-url", help="overrides KALLGLOT_EMULATOR_PUBLIC_URL")
    args = parser.parse_args(argv)
    config = {name: value for name, value in (("KALLGLOT_EMULATOR_API_KEY", args.api_key),
                                               ("KALLGLOT_EMULATOR_PUBLIC_URL", args.public_url)) if value}
    app = create_emulator_app(config)
    server = WSGIServer((args.host, args.port), app)
    print(f"Kallglot emulator listening on http://{args.host}:{server.server_port} "
          f"(API key: {app.extensions['kallglot_emulator'].api_key})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
