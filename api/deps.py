"""Request-scoped dependencies: the database session (one transaction) and the caller."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.errors import PermissionDenied, Unauthorized
from api.services import Services
from api.tenancy import keys
from api.tenancy.service import Principal, authenticate
from models_db.session import autocommit


async def get_services(request: Request) -> Services:  # async: no thread-pool hop
    services: Services = request.app.state.services
    return services


def get_session(request: Request) -> Iterator[Session]:
    """One request, one transaction: committed before the response is sent."""
    services: Services = request.app.state.services
    session = services.session_factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def statement_session(services: Services) -> Session:
    """A session for a write that is one statement: on Postgres each statement commits on its
    own (no BEGIN and COMMIT round trips), elsewhere it is an ordinary transaction. Either way
    the caller calls ``commit()`` (which fires the session's after-commit hooks) and closes it.
    """
    return services.session_factory(bind=autocommit(services.engine))


ServicesDep = Annotated[Services, Depends(get_services)]
# scope="function" ends the transaction before the response leaves, so a client that reads
# right after a create always sees its own write.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def _bearer_token(request: Request) -> str:
    try:
        return keys.bearer_token(request.headers.getlist("authorization"))
    except keys.BadAuthorization as exc:
        raise Unauthorized(str(exc), code=exc.code) from None


def _authenticate(services: Services, token: str) -> Principal | None:
    """The database path of authentication, in a short session of its own."""
    with services.session_factory() as session:
        principal = authenticate(session, services.settings.secret_key, token, services.auth_cache)
        session.commit()
        return principal


def require_scope(*accepted: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency that authenticates the key and checks it holds one of ``accepted``.

    Async, so a key remembered by the auth cache costs no thread-pool hop and no database
    connection; only a cache miss goes to a thread (and holds a connection just for the lookup).
    """

    async def dependency(request: Request, services: ServicesDep) -> Principal:
        token = _bearer_token(request)
        principal = None
        if keys.looks_like_key(token):
            principal = services.auth_cache.get(keys.hash_key(services.settings.secret_key, token))
            if principal is None:
                principal = await run_in_threadpool(_authenticate, services, token)
        if principal is None:
            raise Unauthorized(keys.incorrect_key_message(token))
        if not principal.scopes.intersection(accepted):
            raise PermissionDenied(
                "This API key does not have the scope needed for this request "
                f"(needs one of: {', '.join(accepted)})."
            )
        request.state.tenant_id = principal.tenant_id
        return principal

    return dependency


FinetunePrincipal = Annotated[Principal, Depends(require_scope("finetune", "admin"))]
AnyPrincipal = Annotated[Principal, Depends(require_scope("finetune", "inference", "admin"))]
