"""Stage train: build the MLP or CNN from params.yaml, train it, and keep the best epoch by val_loss.

The loop is the Keras guide "Writing a training loop from scratch in TensorFlow", with one
compiled call per epoch: the same model, optimizer, loss and dropout as `fit`, without its
per-step Python and with XLA fusing dropout, the optimizer's element-wise passes and the metrics.
"""

import contextlib
import functools
import hashlib
import itertools
import math
import os
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path

from stages.common import (
    MODEL_FILE,
    PipelineError,
    atomic_path,
    collector_paused,
    eval_rows,
    import_keras,
    load_params,
    load_split,
    model_inputs,
    quiet_stderr,
    run,
    save_model,
    threefry_dropout,
    without_optional_imports,
)

LIVE_DIR = Path("metrics/train")  # DVCLive: per-epoch history and final metrics
SUMMARY_FILE = Path("metrics/model_summary.txt")
XLA_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mnist-dvc" / "xla"
# What TensorFlow logs at ERROR level on each program it loads from the cache: it first tries the
# file as a text proto, and the CPU features it compares include LLVM's tuning ones (prefer-no-gather),
# which the host's list never has. The cache's directory is per CPU, so neither is a fault. Where
# nothing logged before (no CPU-feature line at import), the first of them comes after absl's preamble.
CACHE_NOISE = (
    "Error parsing text-format tensorflow.XlaSerializedCacheEntry",
    "Loading XLA:CPU AOT result",
    "All log messages before absl::InitializeLog() is called are written to STDERR",
)


def use_xla_cache():
    """Keep XLA's compiled programs on disk, so that a run whose shapes were trained before loads its
    epoch instead of compiling it: a few seconds and ~100 MB of peak RSS less for every seed of the
    study, every rerun and every test (docs/decisions/xla-cache.md). TensorFlow matches an entry on
    its whole program, but not on its own version or the CPU, so those name the directory.
    XLA_CACHE=dir moves it, XLA_CACHE=off turns it off. Returns the directory, or None."""
    setting, flags = os.environ.get("XLA_CACHE", ""), os.environ.get("TF_XLA_FLAGS", "")
    if setting == "off" or "persistent_cache_directory" in flags:  # off, or the user's own choice
        return None
    try:
        cpu = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    version = metadata.version("tensorflow-cpu")  # the pinned package (requirements.txt)
    key = hashlib.sha256(f"{version} {platform.machine()} {cpu}".encode()).hexdigest()[:16]
    directory = Path(setting or XLA_CACHE) / key
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a cache only saves time: train without it
        print(f"train: XLA cache off, {directory} cannot be created ({e.strerror}); XLA_CACHE=dir moves it")
        return None
    os.environ["TF_XLA_FLAGS"] = f"{flags} --tf_xla_persistent_cache_directory={directory}".strip()
    return directory


@contextlib.contextmanager
def first_epoch(cache):
    """The first epoch, which compiles, or with a cache may load: without the cache's noise, and with
    a failure that names the cache when there is one (a damaged entry fails to load)."""
    import tensorflow as tf

    if cache is None:
        yield
        return
    try:
        with quiet_stderr(drop=CACHE_NOISE):
            yield
    except tf.errors.OpError as e:
        raise PipelineError(
            f"the first epoch failed: {e.message}; if a file in the XLA cache {cache} is damaged "
            "(cut short, edited), delete that directory (it is rebuilt) or run with XLA_CACHE=off"
        ) from None


def build_model(p, image_shape=(28, 28), classes=10):
    """The model of p["type"]: the classic MLP or the Keras example "Simple MNIST convnet"."""
    import keras

    dropout = threefry_dropout()
    if p["type"] == "cnn":
        # Conv blocks of `filters`, each halved by pooling, an optional Dense layer, dropout, the classifier.
        layers = [keras.Input((*image_shape, 1))]
        for filters in p["filters"]:
            conv = keras.layers.Conv2D(
                filters, p["kernel_size"], activation=p["activation"], padding=p["padding"]
            )
            layers += [conv, keras.layers.MaxPooling2D(2)]
        layers.append(keras.layers.Flatten())
        if p["dense_units"]:
            layers.append(keras.layers.Dense(p["dense_units"], activation=p["activation"]))
        if p["dropout"] > 0:
            layers.append(dropout(p["dropout"]))
    else:  # 784 -> [input Dropout] -> hidden_layers x (Dense hidden_units, activation, Dropout)
        layers = [keras.Input((math.prod(image_shape),))]
        # Absent keys mean no layer and no constraint: the model as it was before they existed.
        if p.get("input_dropout", 0) > 0:
            layers.append(dropout(p["input_dropout"]))
        limit = p.get("max_norm")  # Srivastava et al. 2014: each unit's incoming weights kept in a ball
        norm = keras.constraints.MaxNorm(limit) if limit is not None else None
        for _ in range(p["hidden_layers"]):
            layers.append(
                keras.layers.Dense(p["hidden_units"], activation=p["activation"], kernel_constraint=norm)
            )
            if p["dropout"] > 0:
                layers.append(dropout(p["dropout"]))
    # float32 softmax even under mixed precision, where bfloat16 probabilities would be too coarse.
    layers.append(keras.layers.Dense(classes, activation="softmax", dtype="float32"))
    return keras.Sequential(layers, name=p["type"])


def make_steps(model, optimizer, x, y, divisor, batch_size, jit_compile):
    """(train_epoch(order) -> (loss, accuracy), evaluate(x, y) -> (loss, accuracy)), both compiled.

    Batches are gathered from the uint8 tensors along `order`, a permutation of the samples, so
    the images stay in memory once and are cast to float32 one batch at a time.
    """
    import keras
    import tensorflow as tf

    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    images, labels = tf.constant(model_inputs(model, x)), tf.constant(y.astype("int32"))
    weights = model.trainable_weights
    n = len(x)
    full = n // batch_size  # the last, smaller batch gets a call of its own (static shapes)

    def step(idx):
        xb, yb = tf.cast(tf.gather(images, idx), "float32") / divisor, tf.gather(labels, idx)
        with tf.GradientTape() as tape:
            probs = model(xb, training=True)
            loss = loss_fn(yb, probs)
        optimizer.apply(tape.gradient(loss, weights), weights)
        n = tf.cast(tf.shape(idx)[0], "float32")
        hits = tf.reduce_sum(tf.cast(tf.argmax(probs, 1, output_type="int32") == yb, "float32"))
        return loss * n, hits

    # Without autograph: with the loop written as tf.while_loop there is nothing for it to convert,
    # but it would still rewrite this code and every Keras call inside it on each trace, part of
    # every run's first epoch (docs/decisions/xla-cache.md). Same program.
    compiled = functools.partial(tf.function, jit_compile=jit_compile, autograph=False)

    @compiled
    def full_batches(order):
        batches = tf.reshape(order[: full * batch_size], (full, batch_size))

        def body(i, total, hits):
            loss, right = step(batches[i])
            return i + 1, total + loss, hits + right

        zero = tf.constant(0.0)  # one tf.while_loop inside the one compiled call
        return tf.while_loop(lambda i, *_: i < full, body, (tf.constant(0), zero, zero))[1:]

    @compiled
    def last_batch(idx):
        return step(idx)

    def train_epoch(order):
        total, hits = full_batches(order)
        if full * batch_size < n:
            loss, right = last_batch(order[full * batch_size :])
            total, hits = total + loss, hits + right
        return float(total) / n, float(hits) / n

    @compiled
    def evaluate_call(xs, ys):
        probs = model(tf.cast(xs, "float32") / divisor, training=False)
        hits = tf.cast(tf.argmax(probs, 1, output_type="int32") == ys, "float32")
        return loss_fn(ys, probs), tf.reduce_mean(hits)

    def evaluate(xs, ys):
        """Mean loss and accuracy over a split, in calls of common.eval_rows samples."""
        rows, sums = eval_rows(model, len(xs)), [0.0, 0.0]
        for i in range(0, len(xs), rows):
            k = min(rows, len(xs) - i)
            loss, accuracy = evaluate_call(xs[i : i + k], ys[i : i + k])
            sums = [sums[0] + float(loss) * k, sums[1] + float(accuracy) * k]
        # float32 x count is exact in float64, so a split in one call keeps that call's bits.
        return sums[0] / len(xs), sums[1] / len(xs)

    return train_epoch, evaluate


def set_threads():
    """TRAIN_THREADS=N caps TensorFlow's threads (for runs side by side); the maths is unchanged."""
    import tensorflow as tf

    threads = int(os.environ.get("TRAIN_THREADS") or 0)
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


def train(params, splits, model_path, live_dir, cache=None):
    keras = import_keras()
    import tensorflow as tf

    with without_optional_imports(), collector_paused():
        from dvclive import Live

    seed, t = params["seed"], params["train"]
    set_threads()
    keras.utils.set_random_seed(seed)  # Python, NumPy and Keras: split-independent init and dropout
    tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(t["precision"])
    (x, y, divisor), (x_val, y_val, _) = splits
    n = len(x)
    model = build_model(params["model"], image_shape=x.shape[1:])
    # XLA fuses the MLP's element-wise passes; the CNN cannot use it (check_cnn, README "A CNN").
    jit = t["jit_compile"] if t["jit_compile"] != "auto" else params["model"]["type"] == "mlp"
    config = {} if t["learning_rate"] is None else {"learning_rate": t["learning_rate"]}
    if t.get("lr_schedule", "constant") == "cosine":  # from the rate above to 0 over every step of the run
        rate = t["learning_rate"] or float(keras.optimizers.get(t["optimizer"]).learning_rate)
        steps = t["epochs"] * math.ceil(len(x) / t["batch_size"])
        config["learning_rate"] = keras.optimizers.schedules.CosineDecay(rate, steps)
    optimizer = keras.optimizers.get({"class_name": t["optimizer"], "config": config})
    optimizer.build(model.trainable_weights)  # its slots must exist before tracing
    train_epoch, evaluate = make_steps(model, optimizer, x, y, divisor, t["batch_size"], jit)
    val = (tf.constant(model_inputs(model, x_val)), tf.constant(y_val.astype("int32")))
    # TensorFlow holds copies of the splits now; the NumPy ones would only add to the peak RSS,
    # which comes later, while XLA compiles.
    splits.clear()
    del x, y, x_val, y_val
    samples, best, seconds = tf.range(n), None, []
    with Live(str(live_dir), dvcyaml=None, save_dvc_exp=False) as live:
        start = time.perf_counter()
        for epoch in range(t["epochs"]):
            began = time.perf_counter()
            order = tf.random.experimental.stateless_shuffle(samples, [seed, epoch])  # seeded batch order
            with first_epoch(cache) if epoch == 0 else contextlib.nullcontext():
                loss, accuracy = train_epoch(order)
                val_loss, val_accuracy = evaluate(*val)
            if best is None or val_loss < best[1]:
                best = (epoch + 1, val_loss, val_accuracy)
                save_model(model, model_path)
            seconds.append(time.perf_counter() - began)
            for name, value in (("loss", loss), ("accuracy", accuracy)):
                live.log_metric(f"train/{name}", value)
            for name, value in (("loss", val_loss), ("accuracy", val_accuracy)):
                live.log_metric(f"eval/{name}", value)
            live.next_step()
            print(
                f"train: epoch {epoch + 1}/{t['epochs']} loss {loss:.4f} accuracy {accuracy:.4f} "
                f"val_loss {val_loss:.4f} val_accuracy {val_accuracy:.4f} {seconds[-1]:.2f} s",
                flush=True,
            )
        total = time.perf_counter() - start
        live.summary.update(
            params=model.count_params(),
            best_epoch=best[0],
            best_val_loss=best[1],
            best_val_accuracy=best[2],  # of the kept checkpoint: what `make tune` maximises
            train_seconds=round(total, 2),  # the epoch loop: training, validation, checkpoints
            first_epoch_seconds=round(seconds[0], 3),  # includes tracing and XLA compilation
            epoch_seconds=round(statistics.median(seconds[1:] or seconds), 3),  # median of the rest
            samples_per_second=round(n * t["epochs"] / total, 1),
            jit_compile=jit,  # as run: `auto` resolved
        )
    return model, live.summary


def conv_sides(p, side=28):
    """The image side after each conv block of the CNN: convolution, then 2x2 pooling."""
    sides = []
    for _ in p["filters"]:
        side = (side - (p["kernel_size"] - 1 if p["padding"] == "valid" else 0)) // 2
        sides.append(side)
    return sides


def check_cnn(p, t):
    """Fail before TensorFlow on a CNN that cannot run: too many blocks, or XLA asked for."""
    if t["jit_compile"] is True:  # `auto` and false run the CNN without XLA
        raise PipelineError(
            "params.yaml: train.jit_compile true cannot train the CNN: XLA has no deterministic MaxPool "
            "gradient (and is slower here); use auto or false"
        )
    if min(conv_sides(p)) < 1:
        raise PipelineError(
            f"params.yaml: model.filters {p['filters']} with model.kernel_size {p['kernel_size']} and "
            f"model.padding {p['padding']} shrink the 28x28 image to nothing; "
            "use fewer blocks or a smaller kernel"
        )


def parameter_count(p, side=28, classes=10):
    """The weights build_model(p) creates, worked out from params alone (no tensor is allocated)."""
    if p["type"] == "cnn":
        channels, count = [1, *p["filters"]], 0
        for c_in, c_out in itertools.pairwise(channels):
            count += p["kernel_size"] ** 2 * c_in * c_out + c_out
        width = conv_sides(p, side)[-1] ** 2 * channels[-1]
        widths = [width, p["dense_units"]] if p["dense_units"] else [width]
    else:
        count, widths = 0, [side * side] + [p["hidden_units"]] * p["hidden_layers"]
    widths.append(classes)
    return count + sum((a + 1) * b for a, b in itertools.pairwise(widths))


def machine_memory():
    """Bytes of RAM this process may use: the machine's, or its cgroup's limit where lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()  # "max" when unlimited
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def check_size(params, n_train):
    """Fail before TensorFlow on a batch larger than the training split, or a model larger than memory."""
    batch = params["train"]["batch_size"]
    if batch > n_train:  # refused, not shrunk: the run would be recorded with a batch size it did not use
        raise PipelineError(
            f"params.yaml: train.batch_size {batch} is more than the {n_train} training images; lower it, "
            "or keep more images for training (preprocess.validation_split, preprocess.train_size)"
        )
    p = params["model"]
    count = parameter_count(p)
    need, have = 2 * 4 * count, machine_memory()  # float32 weights and their gradients, at the least
    if need > have:
        shape = (
            f"model.filters {p['filters']}, model.dense_units {p['dense_units']}"
            if p["type"] == "cnn"
            else f"model.hidden_units {p['hidden_units']}, model.hidden_layers {p['hidden_layers']}"
        )
        raise PipelineError(
            f"params.yaml: {shape} make {count:,} parameters, at least {need / 1e9:,.1f} GB for their "
            f"float32 weights and gradients, but this machine has {have / 1e9:,.1f} GB; use a smaller model"
        )


def main():
    params = load_params("seed", "model", "train")  # before TensorFlow: a typo fails in milliseconds
    if params["model"]["type"] == "cnn":
        check_cnn(params["model"], params["train"])
    splits = [load_split("train"), load_split("val")]  # a list: train() releases them
    check_size(params, len(splits[0][1]))
    cache = use_xla_cache()  # before TensorFlow starts: it reads TF_XLA_FLAGS once
    with atomic_path(MODEL_FILE) as model_path, atomic_path(LIVE_DIR) as live_dir:
        model, summary = train(params, splits, model_path, live_dir, cache)
    lines = []
    model.summary(print_fn=lambda text, line_break=True: lines.append(text))
    with atomic_path(SUMMARY_FILE) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print(
        f"train: best epoch {summary['best_epoch']} of {params['train']['epochs']} "
        f"(val_loss {summary['best_val_loss']:.4f}), {summary['train_seconds']} s, "
        f"{summary['params']:,} parameters"
    )


if __name__ == "__main__":
    run(main)
