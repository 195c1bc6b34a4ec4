"""The run configuration: YAML files + overlays + CLI overrides -> one frozen dataclass tree.

Resolution order (later wins): ``configs/<dataset>.yaml`` (or ``--config``), its ``synthetic:``
overlay when no ``--data-root`` is given, the ``presets.<name>:`` overlay (``--preset``; its
``with_data_root:`` part only when a ``--data-root`` is given), overlay
files (``--overlay``: a path, or a name in ``configs/overlays/`` such as ``base-sep``), the
dedicated CLI flags, then every ``--set key=value`` (dotted keys, e.g. ``train.epochs=5``).
Unknown keys are errors that list the valid ones; values are checked by the dataclasses
(``TrainConfig``, ``GenerateConfig``, :class:`DataSettings`, :class:`RunConfig`), whose messages name
the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from .data.specs import DATASETS
from .train.settings import TrainConfig
from .ue.settings import GenerateConfig

METHODS = ("mtlue", "pgd", "ar", "random")
VICTIMS = ("mtl", "stl")
DEFENSES = ("none", "jpeg", "bdr", "grayscale", "augment", "adv")
VICTIM_DATA = ("cache", "files")
EXPORT_RESOLUTIONS = ("original", "working")
EXPORT_UPSAMPLES = ("nearest", "inverse")
STAGES = ("prepare", "surrogate", "generate", "export", "victim", "report")


def config_dir() -> Path:
    """The folder of the shipped YAML configs: ``configs/`` of a source checkout, else the copy
    installed with the package (``mtlue_fast._configs``)."""
    checkout = Path(__file__).resolve().parent.parent / "configs"
    if (checkout / "chestxray.yaml").is_file():
        return checkout
    return Path(__file__).resolve().parent / "_configs"


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it."""


@dataclass(frozen=True)
class DataSettings:
    """Where the data comes from and at which resolution it is used.

    Attributes:
        cache_size: ``[H, W]`` of the uint8 cache (None: docs/method.md working resolution).
        crop: the victim's crop ``[h, w]`` (None: docs/method.md crop scaled to the cache).
        decoder: ``auto`` (on a GPU: DALI's GPU decoder, else torchvision's; otherwise DALI's CPU
            pipeline, else PIL), ``dali``, ``torchvision`` or ``pil``.
        synthetic_train, synthetic_test: images of the built-in synthetic sample (no --data-root).
        synthetic_size: ``[H, W]`` of the synthetic images (None: the dataset's default).
        synthetic_seed: its seed.
        subset: use a seeded, stratified subset of this many training images (None: all of them;
            ``--subset``); see :mod:`mtlue_fast.data.subset`. Part of the cache entry and the run's digest.
        subset_test: the same for the test split (``--subset-test``).
        subset_seed: the subsets' seed.
    """

    cache_size: tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    decoder: str = "auto"
    synthetic_train: int = 10000
    synthetic_test: int = 3000
    synthetic_size: tuple[int, int] | None = None
    synthetic_seed: int = 0
    subset: int | None = None
    subset_test: int | None = None
    subset_seed: int = 0

    def __post_init__(self) -> None:
        if self.decoder not in ("auto", "dali", "torchvision", "pil"):
            raise ConfigError(f"data.decoder must be 'auto', 'dali', 'torchvision' or 'pil', got {self.decoder!r}")
        for name in ("synthetic_train", "synthetic_test"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("subset", "subset_test"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"data.{name} must be a positive number of images or null (all), got {value!r}")
        if self.subset_seed < 0:
            raise ConfigError(f"data.subset_seed must be >= 0, got {self.subset_seed!r}")
        for name in ("cache_size", "crop", "synthetic_size"):
            value = getattr(self, name)
            if value is not None and (len(value) != 2 or min(value) < 1):
                raise ConfigError(f"data.{name} must be [height, width] of positive integers, got {value!r}")


#: Victim settings that, when set, replace the surrogate's ``train.<name>`` for the victims.
VICTIM_RECIPE = ("backbone", "weighting", "width", "epochs")
#: Those of them added after runs were recorded: left out of a run's identity while unset or the surrogate's.
OPTIONAL_VICTIM_SETTINGS = ("width", "epochs")


@dataclass(frozen=True)
class VictimSettings:
    """The victims that measure the protection, separate from the surrogate the generator attacks.

    Attributes:
        seeds: how many clean/protected victim pairs to train (``--victim-seeds``).
        first_seed: the first pair's seed; pair ``i`` uses ``first_seed + i`` (None: the surrogate's
            ``train.seed + 1``). No victim seed may equal the surrogate's seed: such a victim starts from
            the very weights the generator attacked and retraces the surrogate's data order.
        backbone, weighting: the victims' recipe (None: the surrogate's ``train.backbone`` /
            ``train.weighting``); ``--backbone`` / ``--weighting`` set these, so a protected export
            can be measured against other recipes (transfer) without redoing it.
        width: the victims' channel multiplier (None: the surrogate's ``train.width``), e.g. a
            victim wider than the surrogate the generator attacked.
        epochs: the victims' training epochs (None: the surrogate's ``train.epochs``); the learning
            rate's milestones stay fractions of them.
        reuse_surrogate: report the clean surrogate's metrics as every pair's clean victim instead of
            training clean victims (cheaper, flattering: off by default).
        data: what the protected victims train on (``--victim-data``): ``cache``, the protected
            uint8 cache the export wrote; ``files``, a cache the ordinary reader builds from the
            published image files (``OUT/protected/images``, needs ``export_images``), as an
            unauthorised user of the published dataset would.
        processes: on a CPU, how many victims train at once, each in a process of its own with an
            equal share of the threads (``auto``: as many as there are victims and threads, for
            victims that see at least 20,000 images over their epochs; 1: one after another with
            every thread). A GPU or ``torchrun`` trains them one after another.
            A victim's numbers are those of the same victim trained alone with that many threads;
            like the thread count, the setting is not part of the run's identity.
    """

    seeds: int = 1
    first_seed: int | None = None
    backbone: str | None = None
    weighting: str | None = None
    width: float | None = None
    epochs: int | None = None
    reuse_surrogate: bool = False
    data: str = "cache"
    processes: int | str = "auto"

    def __post_init__(self) -> None:
        if self.processes != "auto" and (isinstance(self.processes, bool) or not isinstance(self.processes, int) or self.processes < 1):
            raise ConfigError(f"victims.processes must be 'auto' or an integer >= 1, got {self.processes!r}")
        if self.seeds < 1:
            raise ConfigError(f"victims.seeds must be >= 1, got {self.seeds!r}")
        if self.first_seed is not None and self.first_seed < 0:
            raise ConfigError(f"victims.first_seed must be >= 0, got {self.first_seed!r}")
        if self.data not in VICTIM_DATA:
            raise ConfigError(f"victims.data must be one of {', '.join(VICTIM_DATA)}, got {self.data!r}")


@dataclass(frozen=True)
class RunConfig:
    """Everything one ``python -m mtlue_fast.run`` does.

    Attributes:
        dataset: ``celeba``, ``chestxray``, ``utkface`` or ``nyuv2``.
        data: :class:`DataSettings`.
        train: the clean surrogate's :class:`~mtlue_fast.train.TrainConfig` (its ``seed``, ``backbone``
            and ``weighting`` are the surrogate's); the victims train with the same settings except
            for what ``victims`` changes.
        victims: :class:`VictimSettings` (seeds and recipe of the victims).
        generate: the generator's :class:`~mtlue_fast.ue.generate.GenerateConfig` (its ``eps`` is
            the run's budget for every method).
        method: ``mtlue`` or a baseline: ``pgd`` (sample-wise, with ``generate.base``), ``ar``, ``random``.
        victim: ``mtl`` (one multi-task network) or ``stl`` (one network per task).
        defense: victim-side defence on the protected training data (``none``, ``jpeg``, ``bdr``,
            ``grayscale``, ``augment``, ``adv``).
        sep_every: SEP's checkpoint spacing in epochs of the clean surrogate run.
        export_images: also write the protected dataset as image files in its original layout
            (``OUT/protected/images``).
        export_resolution: ``original`` (every image of both splits at its original size, the
            training images protected; :func:`mtlue_fast.ue.publish.write_image_files`) or
            ``working`` (the training images only, at the cache's working resolution).
        export_upsample: how the working-resolution perturbation is carried back to the original
            size: ``nearest`` (nearest neighbour) or ``inverse`` (nearest corrected so that the
            cache's own resize gives the perturbation back, within the budget; slower; CelebA's default).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    """

    dataset: str
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    victims: VictimSettings = field(default_factory=VictimSettings)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    method: str = "mtlue"
    victim: str = "mtl"
    defense: str = "none"
    sep_every: int = 4
    export_images: bool = False
    export_resolution: str = "original"
    export_upsample: str = "nearest"
    device: str = "auto"

    def __post_init__(self) -> None:
        checks = {"dataset": DATASETS, "method": METHODS, "victim": VICTIMS, "defense": DEFENSES, "device": ("auto", "cpu", "cuda"),
                  "export_resolution": EXPORT_RESOLUTIONS, "export_upsample": EXPORT_UPSAMPLES}  # fmt: skip
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.sep_every < 1:
            raise ConfigError(f"sep_every must be >= 1, got {self.sep_every!r}")
        if self.victims.data == "files" and not self.export_images:
            raise ConfigError("victims.data=files (--victim-data files) trains the victims on the published image "
                              "files: set export_images too (--export-images)")
        if self.train.seed in self.victim_seeds():
            raise ConfigError(
                f"victims.first_seed={self.victims.first_seed} with victims.seeds={self.victims.seeds} includes the "
                f"surrogate's seed train.seed={self.train.seed}; victims must have seeds of their own"
            )
        for name in VICTIM_RECIPE:
            value = getattr(self.victims, name)
            if value is not None:
                try:
                    self.train.replace(**{name: value})  # TrainConfig checks the value
                except ValueError as error:
                    raise ConfigError(f"victims.{name}: {error}") from None

    def surrogate_can_be_the_clean_victim(self) -> bool:
        """Whether the clean surrogate may stand in for the clean victims (``victims.reuse_surrogate``):
        multi-task, undefended victims with the surrogate's backbone, weighting, width and epochs."""
        recipe = self.victim_train(self.train.seed)
        same = all(getattr(recipe, name) == getattr(self.train, name) for name in VICTIM_RECIPE)
        return same and self.victim == "mtl" and self.defense == "none"

    def victim_seeds(self) -> list[int]:
        """The victims' seeds, one per clean/protected pair (never the surrogate's ``train.seed``)."""
        first = self.victims.first_seed if self.victims.first_seed is not None else self.train.seed + 1
        return list(range(first, first + self.victims.seeds))

    def victim_train(self, seed: int):
        """The :class:`TrainConfig` of the victims of ``seed``: the surrogate's settings with the
        victims' recipe and seed, keeping no checkpoints."""
        changes = {name: getattr(self.victims, name) for name in VICTIM_RECIPE if getattr(self.victims, name) is not None}
        return self.train.replace(seed=seed, keep_every=0, **changes)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def identity(self) -> dict:
        """:meth:`to_dict` without the switches that only change what is printed (``progress``), so a
        ``--quiet`` rerun is the same run."""
        return identity_of(self.to_dict())


def identity_of(settings: dict) -> dict:
    """A resolved configuration's dict without its ``train.progress`` / ``generate.progress``, its
    ``victims.processes``, nor a ``victims.width`` or ``victims.epochs`` that is unset or the
    surrogate's (the same victims; runs recorded before the settings existed keep their digests)."""
    out = dict(settings)
    for section in ("train", "generate"):
        if isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k != "progress"}
    victims, train = out.get("victims"), out.get("train")
    if isinstance(victims, dict):
        # processes only schedules the victims, as the thread count does.
        drop = {"processes"} | {name for name in OPTIONAL_VICTIM_SETTINGS if victims.get(name) in (None, (train or {}).get(name))}
        out["victims"] = {k: v for k, v in victims.items() if k not in drop}
    return out


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------- building


def valid_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key the configuration accepts (``train.epochs``, ``generate.base``, ...)."""
    keys = []
    for f in fields(cls):
        nested = _dataclass_type(cls, f.name)
        if nested is not None:
            keys += valid_keys(nested, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def _dataclass_type(cls: type, name: str) -> type | None:
    hint = _hints(cls)[name]
    return hint if dataclasses.is_dataclass(hint) else None


def build(cls: type, values: dict, prefix: str = ""):
    """``cls(**values)`` with nested dataclasses built recursively, lists turned into tuples where the
    field is a tuple, and unknown keys or wrong types reported with their dotted name."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(unknown_key_message(prefix + str(unknown[0]), cls, prefix))
    kwargs = {}
    hints = _hints(cls)
    for name, value in values.items():
        nested = _dataclass_type(cls, name)
        if nested is not None:
            kwargs[name] = build(nested, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hints[name], prefix + name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from None


def unknown_key_message(key: str, cls: type = RunConfig, prefix: str = "") -> str:
    """``unknown config key 'train.lrr'; did you mean 'train.lr'?`` for the dotted ``key`` not found in
    the section ``cls`` (whose dotted keys start with ``prefix``). Suggests up to 3 close keys: the
    section's names close to ``key``'s remainder first, then (at the top level) dotted keys close to
    the whole ``key`` (a misspelt section); failing both, other sections' keys whose last part is close to
    ``key``'s (a key in the wrong section). With none close, or when ``key`` names the section itself,
    lists only the section's own keys (a nested section as ``name.*``)."""
    section = _section_entries(cls, prefix)
    rest = key[len(prefix):]
    ranked = _close_keys(key, rest, section, prefix) if rest else []
    if ranked:
        quoted = [repr(k) for k in ranked]
        listed = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
        return f"unknown config key {key!r}; did you mean {listed}?"
    where = f"{prefix}*" if prefix else "the top level"
    return f"unknown config key {key!r}; valid keys in {where}: {', '.join(section.values())}"


def _close_keys(key: str, rest: str, section: dict[str, str], prefix: str) -> list[str]:
    """Up to 3 valid keys close to ``key`` (``rest``: its part after the section ``prefix``)."""
    near = [section[name] for name in difflib.get_close_matches(rest, list(section), n=3)]
    others = [k for k in valid_keys() if not (k.startswith(prefix) and "." not in k[len(prefix):])]
    if not prefix:  # the first part names no section: perhaps a misspelt one
        near += difflib.get_close_matches(key, others, n=3)
    if not near:
        last = key.rsplit(".", 1)[-1]
        lasts = difflib.get_close_matches(last, {k.rsplit(".", 1)[-1] for k in others}, n=3)
        near = [k for name in lasts for k in others if k.rsplit(".", 1)[-1] == name]
    return [k for k in dict.fromkeys(near) if k != key][:3]


def _section_entries(cls: type, prefix: str) -> dict[str, str]:
    """``{field name: dotted key}`` of one section; a nested section's key is ``prefix + name + ".*"``."""
    return {f.name: f"{prefix}{f.name}.*" if _dataclass_type(cls, f.name) else prefix + f.name for f in fields(cls)}


def _key_section(key: str) -> tuple[type, str]:
    """The deepest section named by the leading parts of the dotted ``key`` (all of it when ``key``
    names a section): ``(dataclass, prefix)``."""
    cls, prefix = RunConfig, ""
    for part in key.split("."):
        nested = _dataclass_type(cls, part) if part in {f.name for f in fields(cls)} else None
        if nested is None:
            break
        cls, prefix = nested, f"{prefix}{part}."
    return cls, prefix


def _coerce(value, hint, key: str):
    """Check ``value`` against the annotation ``hint`` (bool/int/float/str/tuple/dict/None unions)."""
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{key} must not be null")
    for option in options:
        origin = typing.get_origin(option) or option
        if origin is bool and isinstance(value, bool):
            return value
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is str and isinstance(value, str):
            return value
        if origin is tuple and isinstance(value, (list, tuple)):
            return tuple(value)
        if origin is dict and isinstance(value, dict):
            return dict(value)
    expected = " or ".join(_type_name(o) for o in options)
    raise ConfigError(f"{key} must be {expected}, got {value!r}")


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _type_name(hint) -> str:
    origin = typing.get_origin(hint) or hint
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", tuple: "a list",
            dict: "a mapping", type(None): "null"}.get(origin, str(hint))  # fmt: skip


# ---------------------------------------------------------------------------- files and overrides


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def merge(base: dict, overlay: dict) -> dict:
    """Recursive dict merge (overlay wins; nested mappings merged key by key)."""
    out = dict(base)
    for key, value in (overlay or {}).items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_set(assignments: list[str]) -> dict:
    """``["train.epochs=5", "generate.base=em"]`` -> nested dict; values parsed as YAML scalars."""
    out: dict = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        if key not in valid_keys():
            raise ConfigError(unknown_key_message(key, *_key_section(key)))
        value = yaml.safe_load(raw) if raw.strip() else None
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def resolve(
    dataset: str,
    *,
    config_file: str | Path | None = None,
    synthetic: bool,
    preset: str = "default",
    overlays: list[str] | None = None,
    overrides: dict | None = None,
    assignments: list[str] | None = None,
) -> RunConfig:
    """The :class:`RunConfig` for ``dataset`` (see the module docstring for the order)."""
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    path = Path(config_file) if config_file else config_dir() / f"{dataset}.yaml"
    data = read_yaml(path)
    sections = {"synthetic": data.pop("synthetic", {}) or {}, "presets": data.pop("presets", {}) or {}}
    if data.get("dataset", dataset) != dataset:
        raise ConfigError(f"config file {path} is for dataset {data['dataset']!r}, not {dataset!r}")
    data["dataset"] = dataset
    if synthetic:
        data = merge(data, sections["synthetic"])
    if preset != "default":
        presets = sections["presets"]
        if preset not in presets:
            raise ConfigError(f"unknown preset {preset!r} in {path}; available: default, {', '.join(presets)}")
        chosen = dict(presets[preset] or {})
        # A preset's ``with_data_root:`` part applies to real data only (e.g. smoke's subset).
        real = chosen.pop("with_data_root", None) or {}
        data = merge(data, chosen)
        if not synthetic:
            data = merge(data, real)
    for overlay in overlays or []:
        data = merge(data, read_yaml(overlay_path(overlay)))
    data = merge(data, overrides or {})
    data = merge(data, parse_set(assignments or []))
    return build(RunConfig, data)


def overlay_path(name: str) -> Path:
    """An overlay file: an existing path, or ``configs/overlays/<name>.yaml``."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = config_dir() / "overlays" / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in (config_dir() / "overlays").glob("*.yaml"))
    raise ConfigError(f"overlay {name!r} is neither a file nor one of: {', '.join(names)}")


def dump(config: RunConfig) -> str:
    """The resolved configuration as YAML (what ``OUT/config.yaml`` holds)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=True)
