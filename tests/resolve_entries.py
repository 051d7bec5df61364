"""The two Resolve menu entries as the tests run them: the Python one as a module, the Lua one in LuaJIT (lupa).

No tests here. Each entry object offers ``main(resolve)`` (the menu click; returns the lines the entry printed in
Resolve's console) and ``read_shot(resolve)`` (the bridge request the entry builds). The Lua entry sees the fake
Resolve (tests/resolve_fake.py) through LuaView, which does what Resolve's Lua binding does: Lua tables in and out
for lists and dicts, integral Lua numbers as ints, nil for a method this version lacks.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import itertools
from pathlib import Path

import lupa.luajit21 as luajit  # Resolve's embedded Lua is LuaJIT (Lua 5.1)

_module_ids = itertools.count()


class PythonEntry:
    language = "python"

    def __init__(self, path: Path):
        spec = importlib.util.spec_from_file_location(f"resolve_entry_{next(_module_ids)}", path)
        self.module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.module)

    def main(self, resolve) -> list[str]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.module.main(resolve)
        return out.getvalue().splitlines()

    def read_shot(self, resolve) -> dict:
        return self.module.read_shot(resolve)[1]


class LuaView:
    """A Python object as Resolve's Lua binding shows it; ``host`` converts arguments and results."""

    def __init__(self, target, host: LuaEntry):
        self._target = target
        self._host = host

    def __getattr__(self, name: str):
        method = getattr(self._target, name, None)
        if name.startswith("_") or not callable(method):
            return None  # Lua sees nil: what the entry's version probe expects of a missing method

        def call(*args):
            if args and args[0] is self:  # obj:Method(...) passes the object itself first
                args = args[1:]
            return self._host.to_lua(method(*(self._host.to_python(arg) for arg in args)))

        return call


class LuaEntry:
    language = "lua"

    def __init__(self, path: Path):
        self.runtime = self.runtime_for_tests()
        self.printed: list[str] = []
        self.runtime.globals().print = lambda *words: self.printed.append(" ".join(map(str, words)))
        self.views: dict[int, LuaView] = {}
        self.path = path
        self.module = self.runtime.execute(path.read_text(encoding="utf-8"), "retalk-module")

    @staticmethod
    def runtime_for_tests() -> luajit.LuaRuntime:
        """A LuaJIT whose view of a Python object is its attributes (LuaView's methods)."""

        def get_attribute(obj, name):
            return getattr(obj, name, None)

        def set_attribute(obj, name, value):
            raise AttributeError(f"Resolve objects are read-only from Lua ({name})")

        return luajit.LuaRuntime(
            unpack_returned_tuples=True, attribute_handlers=(get_attribute, set_attribute)
        )

    def wrap(self, target) -> LuaView:
        if id(target) not in self.views:
            self.views[id(target)] = LuaView(target, self)
        return self.views[id(target)]

    def to_lua(self, value):
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, (list, tuple)):
            return self.runtime.table_from([self.to_lua(item) for item in value])
        if isinstance(value, dict):
            return self.runtime.table_from({key: self.to_lua(item) for key, item in value.items()})
        return self.wrap(value)

    def to_python(self, value):
        if isinstance(value, LuaView):
            return value._target
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if luajit.lua_type(value) == "table":
            items = {key: self.to_python(item) for key, item in value.items()}
            if list(items) == list(range(1, len(items) + 1)):
                return [items[index] for index in range(1, len(items) + 1)]
            return items
        return value

    def main(self, resolve) -> list[str]:
        self.printed.clear()
        self.module.main(self.wrap(resolve))
        return "\n".join(self.printed).splitlines()

    def read_shot(self, resolve) -> dict:
        _, request = self.module.read_shot(self.wrap(resolve))
        return self.to_python(request)

    def run_as_script(self, resolve) -> list[str]:
        """The file run whole, as the menu (or `dofile` in Resolve's Lua console) runs it, with `resolve` given."""
        self.printed.clear()
        self.runtime.globals().resolve = self.wrap(resolve)
        self.runtime.globals().dofile(str(self.path))
        return "\n".join(self.printed).splitlines()
