"""Helpers shared by the stage scripts: validated params, atomic outputs, one-line failures."""

import contextlib
import difflib
import functools
import gc
import importlib.machinery
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import zipfile
from pathlib import Path

# DVC runs each stage with the first `python` on PATH; outside the project's environment that one
# lacks the packages, and the user should read which environment to use, not a traceback.
_MISSING = [
    m
    for m in ("numpy", "yaml", "pandas", "matplotlib", "keras", "dvclive", "tqdm")
    if not importlib.machinery.PathFinder.find_spec(m)
]
if _MISSING:
    sys.exit(
        f"error: {sys.executable} lacks {', '.join(_MISSING)}: run `make setup`, then "
        "`source .venv/bin/activate` (or use the make targets, which do both)"
    )

import numpy as np  # noqa: E402
import yaml  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ INFO and WARNING lines

PARAMS_FILE = Path("params.yaml")
PREPARED = Path("data/prepared")
MODEL_FILE = Path("data/model.keras")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # both end a stage as Ctrl-C does
# float32 activations one inference call may hold (16 MB): validating the 784-512-512-10 MLP's
# 12,000 images in one call raised the train stage's peak RSS by 60 MB, the CNN's took 2.9 GB.
EVAL_FLOATS = 2**22

# Plain tuples rather than asking Keras, so that checking params never imports TensorFlow.
ACTIVATIONS = (
    "relu",
    "linear",
    "sigmoid",
    "tanh",
    "elu",
    "selu",
    "gelu",
    "silu",
    "swish",
    "softplus",
    "softsign",
    "leaky_relu",
    "relu6",
    "mish",
    "hard_sigmoid",
    "exponential",
)
OPTIMIZERS = ("rmsprop", "sgd", "adam", "adamw", "nadam", "adamax", "adagrad", "adadelta", "lion")
PRECISIONS = ("float32", "mixed_bfloat16")
CLASS_NAMES = {
    "mnist": tuple(str(d) for d in range(10)),
    "fashion-mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
}


class PipelineError(Exception):
    """A failure the user can fix; reported as one line, without a traceback."""


def _int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v):
    return isinstance(v, int | float) and not isinstance(v, bool)


def _positive_int(v):
    return _int(v) and v > 0


def _optional_positive_int(v):
    return v is None or _positive_int(v)


def _one_of(choices):
    """A rule accepting one of `choices`; a near miss gets a "did you mean" hint."""
    return (lambda v: v in choices, "one of " + ", ".join(choices), choices)


# key -> (check, what is allowed); one place for every stage, so errors read the same everywhere.
SCHEMA = {
    # NumPy's legacy seeding (which Keras calls) accepts only [0, 2**32).
    "seed": (lambda v: _int(v) and 0 <= v < 2**32, "an integer in [0, 2**32)"),
    "data": {"dataset": _one_of(("mnist", "fashion-mnist"))},
    "preprocess": {
        "normalize": (lambda v: isinstance(v, bool), "true or false"),
        "validation_split": (lambda v: _number(v) and 0 < v < 1, "a number in (0, 1)"),
        "train_size": (_optional_positive_int, "a positive integer or null"),
        "test_size": (_optional_positive_int, "a positive integer or null"),
    },
    "model": {
        "type": _one_of(("mlp", "cnn")),
        "hidden_units": (_positive_int, "a positive integer"),
        "hidden_layers": (_positive_int, "a positive integer"),
        "activation": _one_of(ACTIVATIONS),
        "dropout": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
        "input_dropout": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
        "max_norm": (lambda v: v is None or (_number(v) and 0 < v < math.inf), "a positive number or null"),
        "filters": (
            lambda v: isinstance(v, list) and v and all(_positive_int(f) for f in v),
            "a non-empty list of positive integers, e.g. [32, 64]",
        ),
        "kernel_size": (_positive_int, "a positive integer"),
        "padding": _one_of(("valid", "same")),
        "dense_units": (lambda v: _int(v) and v >= 0, "0 or a positive integer"),
    },
    "train": {
        "optimizer": _one_of(OPTIMIZERS),
        "learning_rate": (
            lambda v: v is None or (_number(v) and 0 < v < math.inf),
            "a positive finite number or null",
        ),
        "lr_schedule": _one_of(("constant", "cosine")),
        "batch_size": (_positive_int, "a positive integer"),
        "epochs": (_positive_int, "a positive integer"),
        "jit_compile": (lambda v: isinstance(v, bool) or v == "auto", "true, false or auto"),
        "precision": _one_of(PRECISIONS),
    },
    "plot": {
        "samples": (_positive_int, "a positive integer"),
        "digit_index": (lambda v: _int(v) and v >= 0, "a non-negative integer"),
        "misclassified": (_positive_int, "a positive integer"),
    },
}


def _did_you_mean(key, choices):
    close = difflib.get_close_matches(str(key), list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _check(path, name, value, rule):
    ok, allowed, *choices = rule
    if not ok(value):
        hint = _did_you_mean(value, choices[0]) if choices and isinstance(value, str) else ""
        raise PipelineError(f"{path}: {name} must be {allowed}, got {value!r}{hint}")


def load_params(*sections, path=PARAMS_FILE):
    """Read params.yaml and validate the named top-level keys; fail on the first bad one."""
    try:
        params = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: run from the repository root") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise PipelineError(f"{path}: YAML syntax error{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(params, dict):
        raise PipelineError(f"{path}: expected a mapping of sections, got {type(params).__name__}")
    for key in params:
        if key not in SCHEMA:
            raise PipelineError(f"{path}: unknown key {key}{_did_you_mean(key, SCHEMA)}")
    for section in sections:
        if section not in params:
            raise PipelineError(f"{path}: missing section {section}; restore it with git checkout {path}")
        rules, value = SCHEMA[section], params[section]
        if isinstance(rules, tuple):
            _check(path, section, value, rules)
            continue
        if not isinstance(value, dict):
            raise PipelineError(f"{path}: {section} must be a mapping of keys, got {value!r}")
        for key in value:
            if key not in rules:
                hint = _did_you_mean(key, rules)
                hint = hint.replace("mean ", f"mean {section}.") if hint else ""
                raise PipelineError(f"{path}: unknown key {section}.{key}{hint}")
        for key, rule in rules.items():
            if key not in value:
                raise PipelineError(f"{path}: missing key {section}.{key} ({rule[1]})")
            _check(path, f"{section}.{key}", value[key], rule)
    return params


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary sibling of `path` (file or directory) and move it onto `path` only on success.

    A stage killed at any point leaves the previous output or none, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".tmp-*-{path.name}"):  # left by a killed run
        _remove(stale)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # keeps the suffix: Keras and numpy check it
    try:
        yield tmp
        if tmp.is_dir() and path.exists():
            _remove(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def write_json(path, obj):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def save_split(path, x, y, divisor):
    """np.savez's format, with fixed timestamps instead of the time of writing: the same arrays give
    the same bytes, so a re-run of preprocess keeps its outputs' hashes and DVC does not retrain."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as archive:
        for name, array in (("x", x), ("y", y), ("divisor", np.float32(divisor))):
            with archive.open(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w") as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)


def require(path, stage):
    """`path` if it exists; otherwise the error that names the stage which writes it."""
    if not Path(path).exists():
        raise PipelineError(f"{path} is missing: run `dvc repro {stage}` first")
    return path


def load_split(name):
    """Return (images uint8 [N, 28, 28], labels uint8 [N], pixel divisor) of a prepared split."""
    with np.load(require(PREPARED / f"{name}.npz", "preprocess"), allow_pickle=False) as f:
        return f["x"], f["y"], float(f["divisor"])


def read_model(path=MODEL_FILE):
    """The trained model, loaded in Keras's safe mode; a damaged file or one that holds code is an error."""
    require(path, "train")
    way_back = f"`dvc checkout --force {path}` restores the last trained one, `dvc repro train` retrains it"
    if not zipfile.is_zipfile(path):  # truncated or overwritten: checked before TensorFlow starts
        raise PipelineError(f"{path} is damaged (not a complete .keras archive); {way_back}")
    keras = import_keras()
    try:
        return keras.saving.load_model(path, safe_mode=True)
    except Exception as e:  # the file is untrusted input: whatever Keras, h5py or zipfile raise
        if "safe_mode" in str(e):  # Keras names the switch that would run the code: it stays off
            raise PipelineError(
                f"{path} holds Python code (a Lambda layer or function), which safe mode does not run, "
                f"so it was not loaded; {way_back}"
            ) from None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PipelineError(f"{path} is damaged ({reason}); {way_back}") from None


def eval_rows(model, n):
    """Samples per inference call: all n if their activations (every layer's output) fit EVAL_FLOATS."""
    per_sample = sum(math.prod(layer.output.shape[1:]) for layer in model.layers)
    return max(1, min(n, EVAL_FLOATS // per_sample))


def model_inputs(model, x):
    """Images [N, 28, 28] in the shape the model takes: (N, 784) for the MLP, (N, 28, 28, 1) for a CNN."""
    return x.reshape(len(x), *model.input_shape[1:])


@contextlib.contextmanager
def quiet_stderr(drop=None):
    """File descriptor 2 held back for the block, then shown without the lines that contain any of
    `drop` (None: none shown). TensorFlow's C++ log lines ignore Python's sys.stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if drop is not None:
                held.seek(0)
                lines = held.read().decode(errors="replace").splitlines(keepends=True)
                sys.stderr.write("".join(ln for ln in lines if not any(d in ln for d in drop)))


@contextlib.contextmanager
def without_optional_imports():
    """Imports inside skip JAX, pandas and matplotlib where they are optional. TensorFlow, Keras and
    DVCLive import them wherever they are installed, for parts no stage uses through them: peak
    memory and start-up time for nothing (docs/decisions/keras-without-optional-imports.md). A None
    entry makes `import` fail, which they catch; a package the stage imported itself stays, and a
    later import works as usual."""
    hidden = [name for name in ("jax", "pandas", "matplotlib") if name not in sys.modules]
    sys.modules.update(dict.fromkeys(hidden, None))
    try:
        yield
    finally:
        for name in hidden:
            del sys.modules[name]


@contextlib.contextmanager
def collector_paused():
    """Imports inside run with Python's cyclic garbage collector off, and everything alive after them
    is frozen out of its later passes (gc.freeze): TensorFlow's import makes half a million objects
    that live as long as the process, and the collector's passes over them while they piled up were
    a fifth of every TensorFlow start-up (docs/decisions/collector-paused-imports.md). A block that
    imports nothing new freezes nothing: what is alive then may be garbage awaiting a pass (a model
    read before), and frozen garbage is never freed."""
    enabled, loaded = gc.isenabled(), len(sys.modules)
    gc.disable()
    try:
        yield
    finally:
        if len(sys.modules) > loaded:
            gc.freeze()
        if enabled:
            gc.enable()


def import_keras():
    """Keras on TensorFlow, imported without the start-up banner (import errors still show),
    without_optional_imports and with the collector_paused, with the project's Dropout registered so
    that models holding it load in safe mode."""
    with without_optional_imports(), collector_paused(), quiet_stderr():  # its start-up banner
        import keras
        import tensorflow  # noqa: F401  (the backend, loaded here while stderr is quiet)
    threefry_dropout()
    return keras


@functools.cache
def threefry_dropout():
    """`keras.layers.Dropout` with its masks drawn by ThreeFry: the class, defined on first call.

    Keras's TensorFlow backend leaves the algorithm to TensorFlow, which under XLA picks Philox, and
    XLA's CPU code for Philox is several times slower than for ThreeFry
    (docs/decisions/threefry-masks.md). TensorFlow's own kernels have no ThreeFry, so the mask is
    always drawn in a small XLA-compiled function: the same masks with XLA on or off, at any precision.
    The seed comes from the layer's Keras SeedGenerator, so keras.utils.set_random_seed drives it.
    """
    import keras
    import tensorflow as tf

    @tf.function(jit_compile=True, autograph=False)  # no tensor control flow to convert
    def draw_bits(x, seed, noise_shape):
        shape = (
            tf.shape(x)
            if noise_shape is None
            else [tf.shape(x)[i] if n is None else n for i, n in enumerate(noise_shape)]
        )
        return tf.random.stateless_uniform(
            shape, seed, dtype="uint32", minval=None, maxval=None, alg="threefry"
        )

    @keras.saving.register_keras_serializable(package="stages")
    class ThreeFryDropout(keras.layers.Dropout):
        def call(self, inputs, training=False):
            if not training or self.rate == 0:
                return inputs
            if self.rate == 1:
                return tf.zeros_like(inputs)
            # Keras's own seed handling: int64 state, folded into the int32 that XLA's generators take.
            seed = tf.cast(tf.math.floormod(self.seed_generator.next(), tf.int32.max - 1), "int32")
            # Kept with probability 1 - rate, as uniform >= rate, on all 32 bits instead of a float's 24.
            keep = draw_bits(inputs, seed, self.noise_shape) >= min(round(self.rate * 2**32), 2**32 - 1)
            return tf.where(keep, inputs * tf.cast(1 / (1 - self.rate), inputs.dtype), tf.zeros_like(inputs))

    return ThreeFryDropout


def _renumber_shared(node, ids):
    """Keras names objects shared between layers by their `id()`, a memory address: number them 0, 1, ..."""
    if isinstance(node, dict):
        return {
            k: ids.setdefault(v, len(ids)) if k == "shared_object_id" else _renumber_shared(v, ids)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_renumber_shared(v, ids) for v in node]
    return node


@contextlib.contextmanager
def interrupts_held():
    """Ctrl-C and SIGTERM held until the block ends, then raised as KeyboardInterrupt. Keras's save
    wraps part of its work in a bare `except:` that would swallow one landing there. (A handler, not
    a signal mask: the mask is per thread, and TensorFlow's threads would still take the signal.)"""
    caught = []
    held = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in held.items():
            signal.signal(signum, handler)
        if caught:
            raise KeyboardInterrupt


def save_model(model, path):
    """`model.save`, then the archive rewritten without its save date and with fixed timestamps.

    Identical weights and config then give identical bytes, so a forced retrain that changes
    nothing keeps the model's hash in dvc.lock and DVC skips evaluate and plot.
    """
    with interrupts_held():
        model.save(path)
        with zipfile.ZipFile(path) as archive:
            entries = [(info, archive.read(info)) for info in archive.infolist()]
        with zipfile.ZipFile(path, "w") as archive:
            for info, data in entries:
                if info.filename == "metadata.json":
                    meta = json.loads(data)
                    meta.pop("date_saved", None)
                    data = json.dumps(meta).encode()
                elif info.filename == "config.json":
                    data = json.dumps(_renumber_shared(json.loads(data), {})).encode()
                fixed = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
                fixed.compress_type, fixed.external_attr = info.compress_type, info.external_attr
                archive.writestr(fixed, data)


def way_back(stage):
    """The command that restores what DVC deleted before running `stage`, as a clause to end a message.

    DVC removes a stage's outputs before running it; the cached ones come back with `dvc checkout`,
    the `cache: false` ones (metrics, figures) with git. Empty outside DVC (nothing was deleted) and
    before the stage's first success (nothing to restore).
    """
    if not stage:
        return ""
    try:
        spec = yaml.safe_load(Path("dvc.yaml").read_text())["stages"][stage]
        if stage not in yaml.safe_load(Path("dvc.lock").read_text())["stages"]:
            return ""
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return ""
    cached, in_git = [], []
    for entry in spec.get("outs", []) + spec.get("metrics", []) + spec.get("plots", []):
        path, options = next(iter(entry.items())) if isinstance(entry, dict) else (entry, None)
        (cached if (options or {}).get("cache", True) else in_git).append(path)
    commands = [f"dvc checkout --force {stage}"] if cached else []
    commands += [f"git checkout -- {' '.join(in_git)}"] if in_git else []
    restore = " && ".join(commands)
    return f"; DVC deleted {stage}'s previous outputs: `{restore}` brings back the last committed ones"


def run(main):
    """Run a stage's main(): user errors and interrupts end in one line and a non-zero exit. On
    success the process ends without the interpreter's teardown, slow once TensorFlow is loaded
    (docs/decisions/exit-without-teardown.md): by then every output is written and closed, and
    nothing else is left to run at exit."""
    # SIGTERM cleans up like Ctrl-C; SIGINT too when a background shell started us with it ignored.
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.default_int_handler)
    dvc_stage = os.environ.get("DVC_STAGE")  # set by DVC for the stage command it runs
    try:
        main()
    except PipelineError as e:
        sys.exit(f"error: {e}{way_back(dvc_stage)}")
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM; atomic_path has already removed the partial outputs
        stage = Path(sys.argv[0]).stem
        print(
            f"interrupted: {stage} stopped; no partial output kept, `dvc repro` redoes it"
            f"{way_back(dvc_stage)}",
            file=sys.stderr,
        )
        sys.exit(130)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
