"""Flask extensions, created unbound and bound to the app in ``create_app``."""

from flask_login import LoginManager

from control.csrf import SiteCSRFProtect

csrf = SiteCSRFProtect()
login_manager = LoginManager()
login_manager.login_view = "auth.login"
login_manager.login_message = "Please sign in to continue."
login_manager.session_protection = None  # sessions are server-side rows; see control.auth.sessions
