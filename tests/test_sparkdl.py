"""sparkdl 1.6's quick guide and the spirit of its test suite, against ``pipelines.sparkdl``.

Each quick-guide section of sparkdl's README is ported with only its import changed, plus what
this machine forces: no ImageNet weights offline (``weights="none"`` and a small input size, a
fake class index file), tiny images, and Keras 3 model files that need an extension. Outputs are
compared with bare Keras on the same images, within a tolerance scaled to the output's magnitude
(:func:`assert_close`), as sparkdl's tests compared with Keras.
"""

from __future__ import annotations

import json
import os
import sys

import keras
import numpy as np
import pytest
from pyspark import cloudpickle
from pyspark.ml import Pipeline
from pyspark.ml.classification import LogisticRegression
from pyspark.ml.evaluation import MulticlassClassificationEvaluator
from pyspark.ml.linalg import Vectors, VectorUDT
from pyspark.sql import Row
from pyspark.sql import functions as F
from pyspark.sql.types import (
    ArrayType,
    DoubleType,
    IntegerType,
    StringType,
    StructField,
    StructType,
)

from pipelines.imaging.image_struct import decode_image, encode_png
from pipelines.imaging.resize import resize
from pipelines.ml.models import build_application, preprocess_fn
from pipelines.ml.predictor import register_keras_image_udf
from pipelines.sparkdl import (
    DeepImageFeaturizer,
    DeepImagePredictor,
    KerasImageClassifier,
    KerasImageFileTransformer,
    KerasTransformer,
    imageIO,
    registerKerasImageUDF,
)

# Loaders and preprocessors defined here run on the Python workers, which cannot import this
# test module: ship them by value (a sparkdl user's functions in __main__ travel the same way).
cloudpickle.register_pickle_by_value(sys.modules[__name__])

SIZE = 75  # InceptionV3's Keras minimum


def assert_close(actual, expected, rel: float = 1e-4) -> None:
    """``actual`` equals ``expected`` within ``rel`` times the largest expected magnitude."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    scale = np.abs(expected).max()
    assert scale > 0, "a reference of zeros would make any comparison pass"
    assert np.abs(actual - expected).max() <= rel * scale


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Six colour PNGs (40 x 30), one channel dominant in each, so channel order matters."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(3)
    for i in range(6):
        img = rng.integers(0, 200, size=(40, 30, 3), dtype=np.uint8)
        img[:, :, i % 3] = 255 - i
        (folder / f"img-{i}.png").write_bytes(encode_png(img))
    return folder


def uris(image_dir) -> list[str]:
    return sorted(str(p) for p in image_dir.glob("*.png"))


def rgb_images(image_dir) -> list[np.ndarray]:
    return [decode_image(open(uri, "rb").read()) for uri in uris(image_dir)]


@pytest.fixture(scope="module")
def image_df(spark, image_dir):
    """sparkdl: ``ImageSchema.readImages(dir)``; Spark 4: the image source (BGR structs)."""
    df = spark.read.format("image").load(str(image_dir))
    return (df.withColumn("uri", F.col("image.origin"))
            .withColumn("label", F.regexp_extract("uri", r"img-(\d)", 1).cast("int") % 2)
            .orderBy("uri").coalesce(1))


def keras_reference(model, name, images, size):
    batch = np.stack([resize(a, size, size).astype(np.float32) for a in images])
    return model.predict(preprocess_fn(name)(batch), verbose=0)


# --- Quick guide: transfer learning -----------------------------------------------------------

def test_quick_guide_transfer_learning(image_df, image_dir):
    featurizer = DeepImageFeaturizer(inputCol="image", outputCol="features",
                                     modelName="InceptionV3", weights="none", inputSize=SIZE)
    lr = LogisticRegression(maxIter=20, regParam=0.05, elasticNetParam=0.3, labelCol="label")
    p = Pipeline(stages=[featurizer, lr])

    model = p.fit(image_df)
    df = model.transform(image_df.limit(10)).select("image", "probability", "uri", "label",
                                                     "prediction")
    predictionAndLabels = df.select("prediction", "label")  # noqa: N806 - the README's name
    evaluator = MulticlassClassificationEvaluator(metricName="accuracy")
    accuracy = evaluator.evaluate(predictionAndLabels)
    assert 0.0 <= accuracy <= 1.0

    features = featurizer.transform(image_df).orderBy("uri").collect()
    bare = build_application("InceptionV3", SIZE, "none")
    expected = keras_reference(bare, "InceptionV3", rgb_images(image_dir), SIZE)
    assert_close([r.features.toArray() for r in features], expected)


def test_featurizer_pooling_none_is_sparkdls_flattened_block_and_max_pools(image_df, image_dir):
    base = dict(modelName="MobileNetV2", weights="none", inputSize=32)
    flat = DeepImageFeaturizer(outputCol="flat", pooling="none", **base)
    pooled = DeepImageFeaturizer(outputCol="max", pooling="max", **base)
    rows = pooled.transform(flat.transform(image_df)).orderBy("uri").collect()
    block = build_application("MobileNetV2", 32, "none", pooling="none")
    expected = keras_reference(block, "MobileNetV2", rgb_images(image_dir), 32)
    assert flat.featureDim() == int(np.prod(expected.shape[1:])) == len(rows[0].flat)
    assert_close([r.flat.toArray() for r in rows], expected.reshape(len(expected), -1))
    assert_close([r.max.toArray() for r in rows], expected.max(axis=(1, 2)))


def test_featurizer_accepts_sparkdl_scale_hints(image_df, image_dir):
    featurizer = DeepImageFeaturizer(modelName="MobileNetV2", weights="none", inputSize=32,
                                     scaleHint="SCALE_AREA_AVERAGING")
    assert featurizer.getScaleHint() == "SCALE_AREA_AVERAGING"
    assert featurizer.getResizeMethod() == "area"
    rows = featurizer.transform(image_df).orderBy("uri").collect()
    bare = build_application("MobileNetV2", 32, "none")
    batch = np.stack([resize(a, 32, 32, "area").astype(np.float32)
                      for a in rgb_images(image_dir)])
    expected = bare.predict(preprocess_fn("MobileNetV2")(batch), verbose=0)
    assert_close([r.features.toArray() for r in rows], expected)


# --- Quick guide: applying popular image models -----------------------------------------------

@pytest.fixture(scope="module")
def class_index(tmp_path_factory):
    path = tmp_path_factory.mktemp("keras") / "imagenet_class_index.json"
    path.write_text(json.dumps({str(i): [f"n{i:08d}", f"name_{i}"] for i in range(1000)}))
    return str(path)


def test_quick_guide_deep_image_predictor(image_df, image_dir, class_index):
    predictor = DeepImagePredictor(inputCol="image", outputCol="predicted_labels",
                                   modelName="InceptionV3", decodePredictions=True, topK=10,
                                   weights="none", inputSize=SIZE, classIndexPath=class_index)
    predictions_df = predictor.transform(image_df)
    rows = predictions_df.orderBy("uri").collect()

    bare = build_application("InceptionV3", SIZE, "none", include_top=True)
    probs = keras_reference(bare, "InceptionV3", rgb_images(image_dir), SIZE)
    vectors = DeepImagePredictor(inputCol="image", outputCol="probs", modelName="InceptionV3",
                                 weights="none", inputSize=SIZE).transform(image_df)
    vectors = [r.probs.toArray() for r in vectors.orderBy("uri").collect()]
    assert_close(vectors, probs)
    # Decoding is sparkdl's decode_predictions of that vector: WordNet id, name, probability.
    for row, vector in zip(rows, vectors, strict=True):
        top = np.argsort(-vector, kind="stable")[:10]
        got = [(p["class"], p.description) for p in row.predicted_labels]
        assert got == [(f"n{i:08d}", f"name_{i}") for i in top]
        np.testing.assert_allclose([p.probability for p in row.predicted_labels], vector[top],
                                   rtol=1e-6)


# --- Quick guide: Keras models on images ------------------------------------------------------

@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """The README saves InceptionV3(weights="imagenet") as .h5; here a random MobileNetV2."""
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3))
    path = tmp_path_factory.mktemp("models") / "model-full.h5"
    model.save(str(path))
    return model, str(path)


def loadAndPreprocessKerasInceptionV3(uri):  # noqa: N802 - the README's name
    # this is a typical way to load and prep images in keras
    image = keras.utils.img_to_array(keras.utils.load_img(uri, target_size=(32, 32)))
    image = np.expand_dims(image, axis=0)
    return keras.applications.mobilenet_v2.preprocess_input(image)


def test_quick_guide_keras_image_file_transformer(spark, image_dir, inception_file):
    model, model_path = inception_file
    transformer = KerasImageFileTransformer(inputCol="uri", outputCol="predictions",
                                            modelFile=model_path,
                                            imageLoader=loadAndPreprocessKerasInceptionV3,
                                            outputMode="vector")
    files = uris(image_dir)
    uri_df = spark.createDataFrame(files, StringType()).toDF("uri")
    keras_pred_df = transformer.transform(uri_df)

    assert keras_pred_df.columns == ["uri", "predictions"]
    rows = {r.uri: r.predictions.toArray() for r in keras_pred_df.collect()}
    batch = np.concatenate([loadAndPreprocessKerasInceptionV3(u) for u in files])
    assert_close([rows[u] for u in files], model.predict(batch, verbose=0))


def test_keras_image_file_transformer_image_output_is_a_float32_struct(spark, tmp_path,
                                                                      image_dir):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((12, 10, 3)), keras.layers.Conv2D(3, 3, padding="same")])
    path = str(tmp_path / "filter.keras")
    model.save(path)

    def loader(uri):
        return keras.utils.img_to_array(keras.utils.load_img(uri, target_size=(12, 10))) / 255.0

    files = uris(image_dir)[:3]
    out = KerasImageFileTransformer(modelFile=path, imageLoader=loader, outputMode="image",
                                    outputCol="filtered").transform(
        spark.createDataFrame([(u,) for u in files], "uri string"))
    rows = {r.uri: r.filtered for r in out.collect()}
    expected = model.predict(np.stack([loader(u) for u in files]), verbose=0)
    for uri, want in zip(files, expected, strict=True):
        struct = rows[uri]
        assert (struct.mode, struct.nChannels, struct.origin) == (21, 3, uri)  # CV_32FC3
        stored = imageIO.imageStructToArray(struct)
        assert stored.dtype == np.float32
        assert_close(stored[:, :, ::-1], want)  # stored BGR, like every colour struct


def test_keras_image_file_transformer_handles_unloadable_uris(spark, tmp_path, inception_file):
    _, model_path = inception_file
    good = str(tmp_path / "good.png")
    with open(good, "wb") as fh:
        fh.write(encode_png(np.full((8, 8, 3), 100, np.uint8)))
    df = spark.createDataFrame([(good,), (str(tmp_path / "missing.png"),), (None,)], "uri string")
    stage = KerasImageFileTransformer(modelFile=model_path,
                                      imageLoader=loadAndPreprocessKerasInceptionV3)
    with pytest.raises(Exception, match="invalid image in column 'uri'.*missing.png"):
        stage.transform(df).collect()
    kept = stage.setHandleInvalid("keep").transform(df).collect()
    assert [r.predictions is None for r in kept] == [False, True, True]
    assert [r.uri for r in stage.setHandleInvalid("skip").transform(df).collect()] == [good]


# --- Quick guide: Keras models on tensors -----------------------------------------------------

def test_quick_guide_keras_transformer(spark, tmp_path):
    # Generate random input data
    num_features = 10
    num_examples = 100
    input_data = [{"features": np.random.randn(num_features).tolist()}
                  for i in range(num_examples)]
    input_df = spark.createDataFrame(input_data)

    # Create and save a single-hidden-layer Keras model for binary classification
    model = keras.Sequential()
    model.add(keras.layers.Dense(units=20, input_shape=[num_features], activation="relu"))
    model.add(keras.layers.Dense(units=1, activation="sigmoid"))
    model_path = str(tmp_path / "simple-binary-classification")
    model.save(model_path + ".h5")  # Keras 3 needs the extension to save ...
    os.rename(model_path + ".h5", model_path)  # ... but loads sparkdl's extensionless file

    # Create transformer and apply it to our input data
    transformer = KerasTransformer(inputCol="features", outputCol="predictions",
                                   modelFile=model_path)
    final_df = transformer.transform(input_df)

    assert final_df.columns == ["features", "predictions"]
    rows = final_df.collect()
    expected = model.predict(np.array([r.features for r in rows], np.float32), verbose=0)
    assert_close([r.predictions for r in rows], expected)


def test_keras_transformer_two_dimensional_tensors_and_vectors(spark, tmp_path):
    """sparkdl's test_keras_transformer_2dim: a Reshape model on (2, 3) inputs."""
    model = keras.Sequential([keras.Input((2, 3)), keras.layers.Reshape((2, 3)),
                              keras.layers.Dense(2)])
    path = str(tmp_path / "two_dim.keras")
    model.save(path)
    rng = np.random.default_rng(5)
    data = rng.normal(size=(7, 2, 3))
    schema = StructType([StructField("id", IntegerType()),
                         StructField("nested", ArrayType(ArrayType(DoubleType()))),
                         StructField("vec", VectorUDT())])
    df = spark.createDataFrame(
        [(i, data[i].tolist(), Vectors.dense(data[i].ravel())) for i in range(7)], schema)
    out = KerasTransformer(inputCol="nested", outputCol="out", modelFile=path).transform(df)
    out = KerasTransformer(inputCol="vec", outputCol="out_vec", modelFile=path).transform(out)
    rows = out.orderBy("id").collect()
    expected = model.predict(data.astype(np.float32), verbose=0).reshape(7, -1)
    assert_close([r.out for r in rows], expected)
    assert_close([r.out_vec for r in rows], expected)


def test_keras_transformer_handle_invalid_rows(spark, tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    path = str(tmp_path / "three.keras")
    model.save(path)
    df = spark.createDataFrame([(0, [1.0, 2.0, 3.0]), (1, None), (2, [1.0]), (3, [1.0, None, 2.0])],
                               "id int, x array<double>")
    stage = KerasTransformer(inputCol="x", outputCol="y", modelFile=path)
    with pytest.raises(Exception, match="invalid row in column 'x'"):
        stage.transform(df).collect()
    kept = stage.setHandleInvalid("keep").transform(df).orderBy("id").collect()
    assert [r.y is None for r in kept] == [False, True, True, True]
    assert_close(kept[0].y, model.predict(np.array([[1.0, 2.0, 3.0]]), verbose=0)[0])
    assert [r.id for r in stage.setHandleInvalid("skip").transform(df).collect()] == [0]


# --- Quick guide: deploying models as SQL functions -------------------------------------------

@pytest.fixture(scope="module")
def small_cnn():
    keras.utils.set_random_seed(2)
    return keras.Sequential([
        keras.Input((16, 16, 3)), keras.layers.Rescaling(1 / 255),
        keras.layers.Conv2D(4, 3, activation="relu"), keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(5, activation="softmax"),
    ])


def test_quick_guide_sql_udfs_from_a_model_object_a_file_and_a_preprocessor(
    spark, tmp_path, image_df, image_dir, small_cnn
):
    registerKerasImageUDF("cnn_udf", small_cnn)
    small_cnn.save(str(tmp_path / "model-full-tmp.h5"))
    registerKerasImageUDF("my_custom_keras_model_udf", str(tmp_path / "model-full-tmp.h5"))

    def keras_load_img(fpath):
        from keras.utils import img_to_array, load_img

        img = load_img(fpath, target_size=(16, 16))
        return img_to_array(img).astype(np.uint8)

    registerKerasImageUDF("my_preprocessed_udf", small_cnn, keras_load_img)
    # The same model with a batch preprocessor: the worker reuses the model, not the preprocessing.
    register_keras_image_udf(spark, "halved_udf", small_cnn, preprocessor=_halve)
    image_df.createOrReplaceTempView("sample_images")
    rows = spark.sql(
        "SELECT uri, cnn_udf(image) AS a, my_custom_keras_model_udf(image) AS b, "
        "my_preprocessed_udf(image) AS c, halved_udf(image) AS d "
        "FROM sample_images ORDER BY uri").collect()

    images = rgb_images(image_dir)
    resized = np.stack([resize(a, 16, 16).astype(np.float32) for a in images])
    expected = small_cnn.predict(resized, verbose=0)
    assert_close([r.a for r in rows], expected)
    assert_close([r.b for r in rows], expected)
    via_files = np.stack([keras_load_img(u) for u in uris(image_dir)]).astype(np.float32)
    assert_close([r.c for r in rows], small_cnn.predict(via_files, verbose=0))
    assert_close([r.d for r in rows], small_cnn.predict(resized / 2, verbose=0))


def _halve(batch):
    return batch / 2


def test_sql_udf_tells_a_misspelled_model_name_from_a_missing_file(spark):
    with pytest.raises(ValueError, match="model name of .* Received: model='InceptionV4'"):
        registerKerasImageUDF("nope", "InceptionV4")
    with pytest.raises(ValueError, match="not found on the driver. Received: model="):
        registerKerasImageUDF("nope", "/no/such/model.h5")


# --- Image helpers (sparkdl.image.imageIO) ----------------------------------------------------

def test_image_helpers_round_trip_uint8_and_float32_like_sparkdl(spark, image_dir):
    rng = np.random.default_rng(0)
    for dtype, mode in ((np.uint8, 16), (np.float32, 21)):
        array = (rng.random((5, 4, 3)) * 255).astype(dtype)
        row = imageIO.imageArrayToStruct(array[None], origin="x")
        assert row.mode == mode and imageIO.imageTypeByOrdinal(mode).dtype == np.dtype(dtype).name
        np.testing.assert_array_equal(imageIO.imageStructToArray(row), array)
    df = spark.createDataFrame([Row(image=imageIO.imageArrayToStruct(
        np.ones((2, 3, 1), np.float32)))])
    assert imageIO.imageStructToArray(df.first().image).dtype == np.float32

    decoded = imageIO.readImagesWithCustomFn(str(image_dir), decode_f=imageIO.PIL_decode)
    structs = sorted(decoded.collect(), key=lambda r: r.image.origin)
    first = imageIO.imageStructToArray(structs[0].image)
    np.testing.assert_array_equal(first[:, :, ::-1], rgb_images(image_dir)[0])  # stored BGR
    np.testing.assert_array_equal(np.asarray(imageIO.imageStructToPIL(structs[0].image)),
                                  rgb_images(image_dir)[0])
    resized = decoded.select(imageIO.createResizeImageUDF((8, 6))("image").alias("r")).first()
    assert (resized.r.height, resized.r.width) == (8, 6)


# --- The stage contract: save/load of every stage, bad values, existing output columns ---------

def _double(batch):
    return np.asarray(batch, np.float32) / 127.5 - 1.0


STAGES = {
    "featurizer": lambda p: DeepImageFeaturizer(
        modelName="MobileNetV2", weights="none", inputSize=32, pooling="max",
        scaleHint="SCALE_SMOOTH", batchSize=3, handleInvalid="keep"),
    "predictor": lambda p: DeepImagePredictor(
        modelName="MobileNetV2", weights="none", inputSize=32, topK=2, batchSize=5),
    "classifier": lambda p: KerasImageClassifier(
        modelPath=p["cnn"], preprocessor=_double, batchSize=4, handleInvalid="skip"),
    "classifier_named": lambda p: KerasImageClassifier(
        modelPath=p["cnn"], preprocessor="MobileNetV2"),
    "file_transformer": lambda p: KerasImageFileTransformer(
        modelFile=p["h5"], imageLoader=loadAndPreprocessKerasInceptionV3, batchSize=2),
    "keras_transformer": lambda p: KerasTransformer(
        inputCol="x", modelFile=p["dense"], batchSize=7),
}


@pytest.fixture(scope="module")
def stage_inputs(spark, tmp_path_factory, image_df, image_dir, inception_file, small_cnn):
    folder = tmp_path_factory.mktemp("stage-models")
    small_cnn.save(str(folder / "cnn.h5"))
    dense = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    dense.save(str(folder / "dense.keras"))
    paths = {"cnn": str(folder / "cnn.h5"), "h5": inception_file[1],
             "dense": str(folder / "dense.keras")}
    frames = {
        "image": image_df,
        "uri": spark.createDataFrame([(u,) for u in uris(image_dir)], "uri string"),
        "x": spark.createDataFrame([(i, [float(i)] * 4) for i in range(5)], "id int, x array<double>"),
    }
    return paths, frames


def _frame(name, frames):
    return frames["uri"] if name == "file_transformer" else (
        frames["x"] if name == "keras_transformer" else frames["image"])


def _plain(value):
    if hasattr(value, "toArray"):
        return value.toArray().tolist()
    if isinstance(value, Row):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _outputs(df) -> list[str]:
    rows = df.select(*[c for c in df.columns if c != "image"]).collect()
    return sorted(repr([_plain(v) for v in row]) for row in rows)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_stage_round_trips_through_save_and_load(tmp_path, stage_inputs, name):
    paths, frames = stage_inputs
    stage = STAGES[name](paths)
    stage.save(str(tmp_path / name))
    loaded = type(stage).load(str(tmp_path / name))
    assert loaded.uid == stage.uid
    params = {p.name: v for p, v in stage.extractParamMap().items() if not callable(v)}
    assert {p.name: v for p, v in loaded.extractParamMap().items() if not callable(v)} == params
    df = _frame(name, frames)
    assert _outputs(loaded.transform(df)) == _outputs(stage.transform(df))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: DeepImageFeaturizer(modelName="ResNet152"), "Received: modelName='ResNet152'"),
        (lambda: DeepImageFeaturizer(pooling="flatten"), "Received: pooling='flatten'"),
        (lambda: DeepImageFeaturizer(scaleHint="SCALE_BEST"), "Received: scaleHint='SCALE_BEST'"),
        (lambda: DeepImagePredictor(topK=0), "Received: topK=0"),
        (lambda: DeepImagePredictor(handleInvalid="drop"), "Received: handleInvalid='drop'"),
        (lambda: KerasImageClassifier(preprocessor="ResNet152"), "Received: modelName='ResNet152'"),
        (lambda: KerasImageClassifier(batchSize=-1), "Received: batchSize=-1"),
        (lambda: KerasImageFileTransformer(outputMode="tensor"), "Received: outputMode='tensor'"),
        (lambda: KerasImageFileTransformer(imageLoader="load_img"),
         "Received: imageLoader='load_img'"),
        (lambda: KerasTransformer(batchSize=1.5), "Received: batchSize=1.5"),
        (lambda: KerasTransformer().setHandleInvalid("ignore"), "Received: handleInvalid='ignore'"),
    ],
)
def test_bad_values_raise_on_the_driver_naming_the_param(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_stage_refuses_an_existing_output_column(stage_inputs, name):
    paths, frames = stage_inputs
    stage = STAGES[name](paths)
    df = _frame(name, frames)
    out_param = "probabilityCol" if name.startswith("classifier") else "outputCol"
    df = df.withColumn(stage.getOrDefault(out_param), F.lit(1))
    with pytest.raises(ValueError, match=f"already exists.*Received: {out_param}="):
        stage.transform(df)


def test_keras_transformer_rejects_a_non_array_column(spark, stage_inputs):
    paths, _ = stage_inputs
    df = spark.createDataFrame([("a",)], "x string")
    with pytest.raises(TypeError, match="column 'x' .* Received: string"):
        KerasTransformer(inputCol="x", modelFile=paths["dense"]).transform(df)


@pytest.mark.parametrize(("name", "points_to"), [
    ("KerasImageFileEstimator", "pipelines.ml.KerasImageEstimator"),
    ("HorovodRunner", "KerasImageEstimator(numWorkers=N)"),
    ("TFTransformer", "KerasTransformer"),
])
def test_sparkdl_names_without_an_equivalent_say_what_to_use_instead(name, points_to):
    import pipelines.sparkdl as sparkdl

    with pytest.raises(ImportError, match=rf"sparkdl's {name} has no equivalent") as info:
        getattr(sparkdl, name)
    assert points_to in str(info.value)
