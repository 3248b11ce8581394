"""Stage train: build the MLP from params.yaml, fit it, and keep the best epoch by val_loss."""

import time
from pathlib import Path

from common import MODEL_FILE, atomic_path, load_params, load_split, run

LIVE_DIR = Path("metrics/train")  # DVCLive: per-epoch history and final metrics
SUMMARY_FILE = Path("metrics/model_summary.txt")
VAL_BATCH = 2000  # validation only: same metrics (to float rounding) in 6 steps instead of 94


def build_model(p, input_dim=784, classes=10):
    """784 -> hidden_layers x (Dense hidden_units, activation, Dropout) -> 10 softmax."""
    import keras

    layers = [keras.Input((input_dim,))]
    for _ in range(p["hidden_layers"]):
        layers.append(keras.layers.Dense(p["hidden_units"], activation=p["activation"]))
        if p["dropout"] > 0:
            layers.append(keras.layers.Dropout(p["dropout"]))
    # float32 softmax even under mixed precision, where bfloat16 probabilities would be too coarse.
    layers.append(keras.layers.Dense(classes, activation="softmax", dtype="float32"))
    return keras.Sequential(layers, name="mlp")


def batches(x, y, divisor, batch_size, epochs=1, seed=None):
    """Float32 batches cut from uint8 tensors in memory; `seed` shuffles each epoch differently.

    One seeded permutation of indices per epoch and a tf.gather per batch: a few tensor ops per
    batch instead of tf.data's per-image shuffle buffer (a second copy of the images).
    """
    import tensorflow as tf

    images, labels = tf.constant(x.reshape(len(x), -1)), tf.constant(y.astype("int32"))
    indices = tf.range(len(x))

    def epoch(e):
        order = indices if seed is None else tf.random.experimental.stateless_shuffle(indices, [seed, e])
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size)

    def cut(i):
        return tf.cast(tf.gather(images, i), "float32") / divisor, tf.gather(labels, i)

    ds = tf.data.Dataset.range(epochs).flat_map(epoch).map(cut, deterministic=True)
    return ds.prefetch(2)


def train(params, model_path, live_dir):
    import keras
    import tensorflow as tf
    from dvclive import Live
    from dvclive.keras import DVCLiveCallback

    seed, t = params["seed"], params["train"]
    keras.utils.set_random_seed(seed)  # Python, NumPy and Keras: split-independent init and dropout
    tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(t["precision"])
    x, y, divisor = load_split("train")
    x_val, y_val, _ = load_split("val")
    model = build_model(params["model"], input_dim=x[0].size)
    optimizer = {"class_name": t["optimizer"], "config": {}}
    if t["learning_rate"] is not None:
        optimizer["config"]["learning_rate"] = t["learning_rate"]
    steps = -(-len(x) // t["batch_size"])  # batches per epoch
    model.compile(
        optimizer=keras.optimizers.get(optimizer),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=t["jit_compile"],
        steps_per_execution=min(t["steps_per_execution"], steps),  # at most one epoch per call
    )
    checkpoint = keras.callbacks.ModelCheckpoint(model_path, monitor="val_loss", save_best_only=True)
    ends = []  # epoch end times, for the per-epoch timing line
    timer = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: ends.append(time.perf_counter()))
    with Live(str(live_dir), dvcyaml=None, save_dvc_exp=False) as live:
        start = time.perf_counter()
        history = model.fit(
            batches(x, y, divisor, t["batch_size"], epochs=t["epochs"], seed=seed),
            steps_per_epoch=steps,  # one dataset holds every epoch, each shuffled with (seed, epoch)
            validation_data=batches(x_val, y_val, divisor, VAL_BATCH),
            epochs=t["epochs"],
            callbacks=[checkpoint, DVCLiveCallback(live=live), timer],
            verbose=0,
        )
        seconds = time.perf_counter() - start
        val_loss = history.history["val_loss"]
        live.summary.update(
            params=model.count_params(),
            best_epoch=val_loss.index(min(val_loss)) + 1,
            best_val_loss=min(val_loss),
            train_seconds=round(seconds, 2),
            samples_per_second=round(len(x) * t["epochs"] / seconds, 1),
        )
    epoch_seconds = [round(b - a, 3) for a, b in zip([start, *ends], ends, strict=False)]
    return model, live.summary, epoch_seconds


def main():
    params = load_params("seed", "model", "train")  # before TensorFlow: a typo fails in milliseconds
    with atomic_path(MODEL_FILE) as model_path, atomic_path(LIVE_DIR) as live_dir:
        model, summary, epoch_seconds = train(params, model_path, live_dir)
    lines = []
    model.summary(print_fn=lambda text, line_break=True: lines.append(text))
    with atomic_path(SUMMARY_FILE) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print(
        f"train: best epoch {summary['best_epoch']} of {params['train']['epochs']} "
        f"(val_loss {summary['best_val_loss']:.4f}), {summary['train_seconds']} s, "
        f"{summary['params']:,} parameters"
    )
    print(f"train: seconds per epoch {' '.join(map(str, epoch_seconds))}")  # read by benchmarks/run.py


if __name__ == "__main__":
    run(main)
