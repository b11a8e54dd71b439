"""/v1/models: base models and the caller's fine-tuned models."""

from __future__ import annotations

from fastapi import APIRouter

from api.catalog import service
from api.catalog.schemas import ModelDeleted, ModelList, ModelObject
from api.deps import AnyPrincipal, FinetunePrincipal, SessionDep
from api.errors import ERROR_RESPONSES
from api.json_body import StrictJSONRoute

router = APIRouter(
    prefix="/v1/models", tags=["models"], responses=ERROR_RESPONSES, route_class=StrictJSONRoute
)


@router.get("", response_model=ModelList)
def list_models(session: SessionDep, principal: AnyPrincipal) -> ModelList:
    """List the base models and your organization's fine-tuned models."""
    return ModelList(data=service.list_models(session, principal))


@router.get("/{model_id:path}", response_model=ModelObject)
def retrieve_model(model_id: str, session: SessionDep, principal: AnyPrincipal) -> ModelObject:
    """Retrieve one model."""
    return service.get_model(session, principal, model_id)


@router.delete("/{model_id:path}", response_model=ModelDeleted)
def delete_model(model_id: str, session: SessionDep, principal: FinetunePrincipal) -> ModelDeleted:
    """Retire one of your fine-tuned models (it stops being served; the name is never reused)."""
    return ModelDeleted(id=service.retire_model(session, principal, model_id), deleted=True)
