"""The contact-center admin UI under ``/admin``: number profiles, connecting numbers, live calls, call log.

Server-rendered Jinja pages (``templates/admin/``) that work without JavaScript; CSS is served from this
package's ``static/`` folder (no CDN). Every page needs a signed-in session (:mod:`app.admin.auth`); with no
``ADMIN_PASSWORD`` configured the whole UI answers 404.
"""
from app.admin import after_call, agent_console, analysis, auth, headers, live, views  # noqa: F401  (routes and hooks register themselves on bp)
from app.admin.blueprint import bp

__all__ = ["bp"]
