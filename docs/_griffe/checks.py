"""A griffe extension for the API reference: every public name must have a docstring, and
signatures show the jaxtyping shapes of the vocabulary aliases (`Image` ->
`Float[Array, "C H W"]`).

A public object without a docstring is logged as a warning, which `mkdocs build --strict`
turns into a failed build. Public: the names `pixeldit_eqx` exports, the members of its
public modules, and the public methods (and `__call__`) of public classes.
"""

import griffe


PUBLIC_MODULES = ("pixeldit_eqx.flow", "pixeldit_eqx.train", "pixeldit_eqx.sharding", "pixeldit_eqx.runtime")
SEED_MODULE = "pixeldit_eqx.modules"
logger = griffe.get_logger("pixeldit_eqx.docs")


def _public(name: str) -> bool:
    return not name.startswith("_") or name == "__call__"


def _target(obj: griffe.Object | griffe.Alias) -> griffe.Object | None:
    try:
        return obj.final_target if obj.is_alias else obj
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


class RequireDocstrings(griffe.Extension):
    """Warns about public objects without a docstring; expands the shape aliases."""

    def __init__(self, package: str = "pixeldit_eqx") -> None:
        super().__init__()
        self.package = package

    def on_package(self, *, pkg: griffe.Module, **kwargs: object) -> None:
        if pkg.name != self.package:
            return
        aliases = self._shape_aliases(pkg)
        checked: set[str] = set()
        names = [n.split(".", 1)[1] for n in PUBLIC_MODULES + (SEED_MODULE,)]
        roots = [pkg] + [pkg.members[n] for n in names if n in pkg.members]
        for module in roots:
            exported = module.exports if module.exports is not None else None
            for name, member in module.members.items():
                if not _public(name) or (exported is not None and name not in exported):
                    continue
                target = _target(member)
                if target is None or target.is_module and module is not pkg:
                    continue
                if member.is_alias and module is not pkg and not (exported and name in exported):
                    continue  # an import, not a name this module defines
                self._check(target, f"{module.path}.{name}", checked, aliases)

    def _shape_aliases(self, pkg: griffe.Module) -> dict[str, griffe.Expr | str]:
        if "_custom_types" not in pkg.members:
            return {}
        types = pkg.members["_custom_types"]
        return {
            name: attr.value
            for name, attr in types.members.items()
            if not attr.is_alias
            and attr.is_attribute
            and attr.value is not None
            and name[0].isupper()
            and name not in ("Array", "ArrayLike", "Bool", "Float", "Int", "Real")
        }

    def _check(self, obj: griffe.Object, shown: str, checked: set[str], aliases: dict) -> None:
        if obj.path in checked:
            return
        checked.add(obj.path)
        if obj.is_module:
            return
        if obj.is_function:
            self._expand(obj, aliases)
        if not obj.is_attribute and (obj.docstring is None or not obj.docstring.value.strip()):
            logger.warning(f"{shown}: a public name without a docstring ({obj.relative_filepath}:{obj.lineno})")
        if obj.is_class:
            for name, member in obj.members.items():
                target = _target(member)
                if _public(name) and target is not None and target.is_function and not name.startswith("__init"):
                    self._check(target, f"{shown}.{name}", checked, aliases)

    @staticmethod
    def _expand(func: griffe.Function, aliases: dict) -> None:
        """`x: Image` -> `x: Float[Array, 'C H W']`, so the signature shows the shape."""
        for param in func.parameters:
            if isinstance(param.annotation, griffe.ExprName) and param.annotation.name in aliases:
                param.annotation = aliases[param.annotation.name]
        if isinstance(func.returns, griffe.ExprName) and func.returns.name in aliases:
            func.returns = aliases[func.returns.name]
