"""Search spaces as data: YAML files mapping config keys to distributions.

    # tune_spaces/lr_schedules.yaml
    optim.schedule: {choice: [cosine, onecycle, multistep]}
    optim.lr: {loguniform: [0.01, 0.5]}
    optim.warmup_epochs: {quniform: [0, 2, 0.5]}     # low, high, q

    # tune_spaces/default.yaml
    include: [lr_schedules.yaml, augmentation.yaml]

Distributions: ``choice`` / ``grid`` (a list of values), ``uniform`` /
``loguniform`` ([low, high]), ``randint`` ([low, high), high exclusive as in
Ray Tune), ``quniform`` / ``qloguniform`` ([low, high, q]) and ``qrandint``
([low, high, q]). :func:`load_space` checks every key against the config
schema and every value (each choice, both bounds) by building a config with
it, so a bad space fails before any trial starts, naming the key.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from imgcls_core.config import Config, ConfigError, set_dotted

SPACES_DIR = Path(__file__).resolve().parent
LISTS = ("choice", "grid")
RANGES = ("uniform", "loguniform", "randint")
QUANTIZED = ("quniform", "qloguniform", "qrandint")
KINDS = LISTS + RANGES + QUANTIZED


class SpaceError(ConfigError):
    """A search space names an unknown key or an impossible distribution (a bad config, exit 2)."""


@dataclass(frozen=True)
class Dist:
    key: str
    kind: str
    args: tuple

    def to_ray(self):
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        return getattr(tune, self.kind)(*self.args) if self.kind != "choice" else tune.choice(list(self.args))

    def describe(self) -> str:
        return f"{self.kind}{list(self.args)}"


@dataclass
class SearchSpace:
    name: str
    dists: dict[str, Dist]
    files: list[Path] = field(default_factory=list)  # the file and every file it includes

    def to_ray(self) -> dict[str, Any]:
        """Ray Tune's param_space, keyed by dotted config keys."""
        return {key: dist.to_ray() for key, dist in self.dists.items()}

    def mutations(self, keys: list[str]) -> dict[str, Any]:
        """PBT's hyperparam_mutations for ``keys``, each of which must be in the space."""
        missing = [k for k in keys if k not in self.dists]
        if missing:
            raise SpaceError(f"tune.pbt_mutate names {missing}, which the space {self.name} does not search; "
                             f"it searches {list(self.dists)}")
        # Lists: PBT moves to a neighbouring value (or resamples); ranges: x0.8 / x1.2 (or resamples).
        return {key: list(self.dists[key].args) if self.dists[key].kind in LISTS else self.dists[key].to_ray()
                for key in keys}

    def bounds(self) -> dict[str, tuple[float, float]]:
        """``(low, high)`` of every ranged key, inclusive (see :func:`clip`)."""
        return {key: (d.args[0], d.args[1] - 1 if d.kind == "randint" else d.args[1])
                for key, d in self.dists.items() if d.kind not in LISTS}

    def params(self) -> dict[str, str]:
        return {f"space.{key}": dist.describe() for key, dist in self.dists.items()}


def apply_sample(base: Config, sample: dict[str, Any]) -> Config:
    """The base config with a trial's sampled values (dotted keys) applied and validated."""
    return Config.from_dict(apply_sample_dict(base.to_dict(), sample))


def apply_sample_dict(data: dict[str, Any], sample: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` (a config in its dict form, as a sweep passes it to its trials) with
    ``sample``'s dotted keys set, numpy scalars as Python numbers; ``data`` is not changed.

    Not validated: a trial adds its own keys (output folder, run name) to the sample and parses
    the result once with ``Config.from_dict``. An unknown key raises ConfigError naming it.
    """
    out = copy.deepcopy(data)
    for key, value in sample.items():
        set_dotted(out, key, plain(value))
    return out


def clip(sample: dict[str, Any], bounds: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """A sample with every ranged value held inside its bounds: PBT multiplies values by 0.8 or
    1.2 and would otherwise walk out of the space (augment.strength > 1 is not a config)."""
    out = dict(sample)
    for key, (low, high) in bounds.items():
        value = sample.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = type(value)(min(max(value, low), high))
    return out


def load_space(path: str | Path, base: Config | None = None) -> SearchSpace:
    """Read, merge (``include``) and validate a space file against ``base`` (default config)."""
    path = _find(path)
    base = base or Config()
    seen: set[Path] = set()
    dists = _read(path, seen=seen)
    if not dists:
        raise SpaceError(f"{path}: the search space is empty")
    for dist in dists.values():
        _validate(dist, base, path)
    return SearchSpace(path.stem, dists, sorted(seen))


def _find(path: str | Path) -> Path:
    path = Path(path)
    for candidate in (path, SPACES_DIR / path, SPACES_DIR / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    raise SpaceError(f"search space {path} not found (looked in . and {SPACES_DIR})")


def _read(path: Path, seen: set[Path]) -> dict[str, Dist]:
    if path.resolve() in seen:
        raise SpaceError(f"{path}: include cycle")
    seen.add(path.resolve())
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        raise SpaceError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise SpaceError(f"{path}: must be a mapping of config keys to distributions")
    dists: dict[str, Dist] = {}
    includes = data.pop("include", []) or []
    for include in [includes] if isinstance(includes, str) else includes:
        # beside the including file first, then (a user's space including a shipped one) tune_spaces/
        local = path.parent / include
        dists.update(_read(local if local.is_file() else _find(include), seen))
    for key, spec in data.items():
        dists[key] = _parse(key, spec, path)
    return dists


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last, silently)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        if twice := sorted({k for k in keys if keys.count(k) > 1}, key=str):
            raise yaml.constructor.ConstructorError(None, None, f"key {twice[0]!r} is given twice",
                                                    node.start_mark)
        return super().construct_mapping(node, deep)


def _parse(key: str, spec: Any, path: Path) -> Dist:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SpaceError(f"{path}: {key}: expected one distribution like {{loguniform: [0.01, 0.5]}}, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind not in KINDS:
        raise SpaceError(f"{path}: {key}: unknown distribution {kind!r}; choose one of {list(KINDS)}")
    if not isinstance(args, list) or not args:
        raise SpaceError(f"{path}: {key}: {kind} needs a non-empty list, got {args!r}")
    if kind in RANGES and len(args) != 2 or kind in QUANTIZED and len(args) != 3:
        raise SpaceError(f"{path}: {key}: {kind} takes {'[low, high]' if kind in RANGES else '[low, high, q]'}, "
                         f"got {args!r}")
    if kind not in LISTS:
        if not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise SpaceError(f"{path}: {key}: {kind} bounds must be numbers, got {args!r}")
        low, high = args[0], args[1]
        if not low < high:
            raise SpaceError(f"{path}: {key}: low ({low}) must be less than high ({high})")
        if "log" in kind and low <= 0:
            raise SpaceError(f"{path}: {key}: {kind} needs low > 0, got {low}")
        if kind in QUANTIZED and args[2] <= 0:
            raise SpaceError(f"{path}: {key}: q must be > 0, got {args[2]}")
        if kind in ("randint", "qrandint") and not all(isinstance(a, int) for a in args):
            raise SpaceError(f"{path}: {key}: {kind} bounds must be integers, got {args!r}")
        if kind in ("quniform", "qloguniform") and not all(math.isclose(b / args[2], round(b / args[2]))
                                                         for b in (low, high)):
            raise SpaceError(f"{path}: {key}: {kind} bounds {low} and {high} must be multiples of q ({args[2]}), "
                             f"as Ray Tune requires")
    return Dist(key, kind, tuple(args))


# Keys a sweep sets itself for every trial (its folder, run name, checkpoints, Ray and MLflow settings) or
# sets once for all trials (the epochs ASHA and the best-trial choice count to, the sweep's own settings):
# searching them would be overridden or would break the sweep.
NOT_SEARCHABLE = ("tune.", "ray.", "tracking.", "serve.", "train.output_dir", "train.keep_checkpoints",
                  "train.epochs", "train.resume")


def _validate(dist: Dist, base: Config, path: Path) -> None:
    """Every value the distribution can produce must make a valid config (bounds checked at both ends)."""
    known = base.flat()
    if dist.key.startswith(NOT_SEARCHABLE) and dist.key in known:
        raise SpaceError(f"{path}: {dist.key} cannot be searched: the sweep sets it for every trial "
                         f"({', '.join(NOT_SEARCHABLE)} are the sweep's own); set it in the config instead")
    if dist.key not in known:
        section = dist.key.split(".")[0]
        near = sorted(k for k in known if k.startswith(section + "."))
        raise SpaceError(f"{path}: unknown config key {dist.key!r}"
                         + (f"; keys in {section}: {', '.join(near)}" if near else ""))
    if dist.kind in LISTS:
        values = list(dist.args)
    elif dist.kind == "randint":
        values = [dist.args[0], dist.args[1] - 1]
    else:
        values = [dist.args[0], dist.args[1]]
    for value in values:
        try:
            apply_sample(base, {dist.key: value})
        except ConfigError as exc:
            raise SpaceError(f"{path}: {dist.key}: value {value!r} makes an invalid config: {exc}") from exc


def plain(value: Any) -> Any:
    """numpy scalars (Ray Tune samples them) as Python numbers."""
    return value.item() if hasattr(value, "item") and callable(value.item) else value
