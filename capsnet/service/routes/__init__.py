"""The routes, one module per family: predict, explain (routing trace, reconstruction, pose sweeps),
health (health, metadata, metrics) and v2 (the Open Inference Protocol). Routes only translate
between HTTP and the domain (inputs, state, engine, protocol).

The dependencies below are `async def`: FastAPI runs a plain `def` dependency in a worker thread,
a hop per request that buys nothing for an attribute lookup.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request

from capsnet.service.state import ServedModel, State, get_state


async def state_dep(request: Request) -> State:
    return get_state(request)


StateDep = Annotated[State, Depends(state_dep)]

ModelQ = Annotated[
    str | None,
    Query(
        description="the model to ask, by the name in its metadata (`/metadata` lists them under "
        "`models`); default: the default model (CAPSNET_MODEL_DIR). 404 for a name not served"
    ),
]


async def model_dep(state: StateDep, model: ModelQ = None) -> ServedModel:
    return state.model(model)


ModelDep = Annotated[ServedModel, Depends(model_dep)]
