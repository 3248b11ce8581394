"""Stage train: build the MLP from params.yaml, fit it, and keep the best epoch by val_loss."""

import time
from pathlib import Path

from common import MODEL_FILE, atomic_path, load_params, load_split, run

LIVE_DIR = Path("metrics/train")  # DVCLive: per-epoch history and final metrics
SUMMARY_FILE = Path("metrics/model_summary.txt")


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


def dataset(x, y, divisor, batch_size, shuffle_seed=None):
    """Batches of flattened float32 pixels; uint8 in memory until a batch is cut."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x.reshape(len(x), -1), y.astype("int32")))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(x), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(lambda a, b: (tf.cast(a, "float32") / divisor, b))
    return ds.prefetch(tf.data.AUTOTUNE)


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
    model.compile(
        optimizer=keras.optimizers.get(optimizer),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=t["jit_compile"],
        steps_per_execution=t["steps_per_execution"],
    )
    checkpoint = keras.callbacks.ModelCheckpoint(model_path, monitor="val_loss", save_best_only=True)
    with Live(str(live_dir), dvcyaml=None, save_dvc_exp=False) as live:
        start = time.perf_counter()
        history = model.fit(
            dataset(x, y, divisor, t["batch_size"], shuffle_seed=seed),
            validation_data=dataset(x_val, y_val, divisor, t["batch_size"]),
            epochs=t["epochs"],
            shuffle=False,  # the dataset reshuffles itself each epoch, seeded
            callbacks=[checkpoint, DVCLiveCallback(live=live)],
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
    return model, live.summary


def main():
    params = load_params("seed", "model", "train")  # before TensorFlow: a typo fails in milliseconds
    with atomic_path(MODEL_FILE) as model_path, atomic_path(LIVE_DIR) as live_dir:
        model, summary = train(params, model_path, live_dir)
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
