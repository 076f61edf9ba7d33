"""The routes, one module per family: predict, explain (routing trace, reconstruction, pose sweeps),
health (health, metadata, metrics) and v2 (the Open Inference Protocol). Routes only translate
between HTTP and the domain (inputs, state, engine, protocol).

The dependencies below are `async def`: FastAPI runs a plain `def` dependency in a worker thread,
a hop per request that buys nothing for an attribute lookup.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.state import ServedModel, State, get_state


async def state_dep(request: Request) -> State:
    return get_state(request)


StateDep = Annotated[State, Depends(state_dep)]


async def default_model_dep(state: StateDep) -> ServedModel:
    return state.default_model()


ModelDep = Annotated[ServedModel, Depends(default_model_dep)]
