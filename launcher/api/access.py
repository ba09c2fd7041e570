"""The API token's rules for one app's paths: who may act, who is shown secrets and what the servers said,
and the 401 each path documents where a token applies (launcher/api/auth.py checks the token itself)."""

from __future__ import annotations

from launcher.api.answers import Authorization, Responses, errors
from launcher.api.auth import bearer_matches


class Unauthorised(Exception):
    """A request that needs the API token came without it (the app answers 401)."""


class Access:
    """``token``: the API token, None when none is configured; ``reads_locked``: reads need it too."""

    def __init__(self, token: str | None, *, reads_locked: bool) -> None:
        self._token = token
        self.read: Responses = errors(401) if reads_locked else {}  # what a read path documents

    def refused(self, *statuses: int) -> Responses:
        """What a path that needs the token documents: 401 when a token is configured, and ``statuses``."""
        return errors(*([401] if self._token is not None else []), *statuses)

    async def authorised(self, authorization: Authorization = None) -> None:
        """A route dependency: the caller holds the token, when one is configured."""
        if self._token is not None and not bearer_matches(authorization, self._token):
            raise Unauthorised()

    def holds_token(self, authorization: str | None) -> bool:
        """Whether the caller sent the API token: only then are secrets shown (launcher/api/redact.py)."""
        return self._token is not None and bearer_matches(authorization, self._token)

    def hides_server_output(self, authorization: str | None) -> bool:
        """A token is configured and the caller lacks it: no log line, nor a server's words, for it."""
        return self._token is not None and not self.holds_token(authorization)
