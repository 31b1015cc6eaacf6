"""Import LanceDB without its REST namespace client, which featuredb never uses.

`import lancedb` pulls in `lance_namespace_urllib3_client`, whose package `__init__` builds some
sixty pydantic-validated REST API classes: about 0.75 s on a 2-core machine, most of a keyword
search from the command line. We register that package as a bare module with its real `__path__`,
so the submodules LanceDB does use (`...models.*`) load from their files as usual and the API
classes are never built. Anything that asks the package itself for a name runs its real
`__init__` at that moment, so nothing is lost, only deferred. Imported first by featuredb.store,
the only place featuredb imports lancedb.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

CLIENT = "lance_namespace_urllib3_client"


def _defer_client_init() -> None:
    if CLIENT in sys.modules:
        return  # already imported (by the user's code): nothing to save
    spec = importlib.util.find_spec(CLIENT)
    if spec is None or not spec.submodule_search_locations:
        return  # another LanceDB version without it
    bare = types.ModuleType(CLIENT)
    bare.__path__ = list(spec.submodule_search_locations)
    bare.__spec__ = spec
    bare.__file__ = spec.origin

    def load_on_demand(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        sys.modules.pop(CLIENT, None)
        return getattr(importlib.import_module(CLIENT), name)

    bare.__getattr__ = load_on_demand  # type: ignore[attr-defined]
    sys.modules[CLIENT] = bare


_defer_client_init()
