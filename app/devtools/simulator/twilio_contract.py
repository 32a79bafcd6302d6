"""The Twilio REST parameters the twilio library itself sends, so the fake REST API accepts exactly those.

Read from the installed library: the wire names are the keys of the form ``CallList._create`` (and
``CallContext._update``) builds, kept only when their value comes from a parameter of the public
``CallList.create`` (``CallContext.update``) signature — the library's own definition of the Calls resource.
"""
from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from collections.abc import Callable
from typing import Any

from twilio.rest.api.v2010.account.call import CallContext, CallList


def _wire_names(builder: Callable[..., Any], public: Callable[..., Any]) -> frozenset[str]:
    parameters = set(inspect.signature(public).parameters) - {"self"}
    tree = ast.parse(textwrap.dedent(inspect.getsource(builder)))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                used = {n.id for n in ast.walk(value) if isinstance(n, ast.Name)}
                if isinstance(key, ast.Constant) and isinstance(key.value, str) and used & parameters:
                    names.add(key.value)
    return frozenset(names)


@functools.cache
def create_call_parameters() -> frozenset[str]:
    """Form fields of ``POST …/Calls.json`` (``CallList.create``): ``To``, ``From``, ``Url``, ``Twiml``…"""
    return _wire_names(CallList._create, CallList.create)


@functools.cache
def update_call_parameters() -> frozenset[str]:
    """Form fields of ``POST …/Calls/{Sid}.json`` (``CallContext.update``): ``Status``, ``Url``, ``Twiml``…"""
    return _wire_names(CallContext._update, CallContext.update)


def unknown_parameters(form_names: Any, allowed: frozenset[str]) -> list[str]:
    """Fields Twilio's API does not define for this request (the library would never send them)."""
    return sorted(set(form_names) - allowed)
