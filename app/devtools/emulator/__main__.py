"""Run the Kallglot emulator under gevent: ``python -m app.devtools.emulator --host 127.0.0.1 --port 8765``."""
from gevent import monkey

monkey.patch_all()  # before anything else imports socket, ssl or threading

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

from gevent.pywsgi import LoggingLogAdapter, WSGIHandler, WSGIServer  # noqa: E402

from app.devtools.emulator import create_emulator_app  # noqa: E402
from app.logging_setup import configure_logging  # noqa: E402


class AccessLogHandler(WSGIHandler):
    """gevent's handler with an access line like the bridge's (gunicorn.conf.py's format): the path without
    its query string, so a stream URL's ``?token=`` never reaches the log."""

    def format_request(self) -> str:
        """``client "METHOD /path HTTP/1.1" status bytes seconds``."""
        path = (self.path or "").split("?", 1)[0]
        seconds = f"{self.time_finish - self.time_start:.6f}" if self.time_finish else "-"
        client = self.client_address[0] if isinstance(self.client_address, tuple) else self.client_address
        status = (self._orig_status or self.status or "000").split()[0]
        return (f'{client or "-"} "{self.command or "-"} {path} {self.request_version or "-"}" {status} '
                f'{self.response_length or "-"} {seconds}s')


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
    configure_logging()  # one JSON object per line on stderr, as the bridge logs (LOG_FORMAT=text for humans)
    app = create_emulator_app(config)
    access_log = LoggingLogAdapter(logging.getLogger("app.devtools.emulator.access"), logging.INFO)
    server = WSGIServer((args.host, args.port), app, handler_class=AccessLogHandler, log=access_log)
    print(f"Kallglot emulator listening on http://{args.host}:{server.server_port} "
          f"(API key: {app.extensions['kallglot_emulator'].api_key})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
