"""KuaiSearch rows <-> TFDS ``tf.train.Example`` records, without TensorFlow.

The TFDS feature spec of each kind (``features(kind)``) is what ``dataset_info.json``/``features.json``
declare, so ``tfds.data_source``/``tfds.builder_from_directory`` decode our shards with TFDS's own
numpy decoder. Types:

- int fields -> ``tfds.features.Scalar(np.int64)``
- str fields -> ``tfds.features.Text()`` (UTF-8 bytes on disk)
- id lists   -> ``tfds.features.Tensor(shape=(None,), dtype=np.int64)`` (variable length)
- floats     -> ``tfds.features.Tensor(shape=(), dtype=np.float64, encoding=BYTES)``: a plain float
  ``Scalar`` is stored in the float32 ``float_list`` of tf.Example and would not round-trip a JSON
  double; the BYTES encoding keeps all 64 bits.
- statistical-feature objects -> nested ``FeaturesDict`` of those floats.

``RecordEncoder`` writes the same protos as TFDS's ``ExampleSerializer`` (same feature keys, kinds
and values; checked in tests) about six times faster, by filling the protobuf directly from a
validated row. ``RecordDecoder`` is the matching fast reader; it returns plain Python/numpy values
(``str`` for text, ``np.ndarray[int64]`` for id lists, ``float``/``int`` for scalars) and agrees with
``features(kind).deserialize_example_np`` (also checked in tests).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from data_pipelines.kuaisearch import schema

VERSION = "1.0.0"
DESCRIPTIONS: Mapping[str, str] = {
    "users": "KuaiSearch user profiles (gender, age bucket, frequent location).",
    "items": "KuaiSearch items: title, brand, seller and three category levels.",
    "recall": "KuaiSearch recall sessions: query, impressed / clicked / purchased item ids.",
    "rank": "KuaiSearch ranking rows: one impressed item of a search session with user and item "
            "context, statistical features and click / purchase labels.",
    "relevance": "KuaiSearch query-item relevance pairs graded 0-3.",
}


def dataset_name(kind: str) -> str:
    """TFDS dataset name of a kind: ``kuaisearch_<kind>``."""
    if kind not in schema.SCHEMAS:
        raise ValueError(f"unknown KuaiSearch kind {kind!r}; expected one of {schema.KINDS}")
    return f"kuaisearch_{kind}"


def _tfds():
    import tensorflow_datasets as tfds  # noqa: PLC0415 - heavy-ish import kept out of schema users

    return tfds


def _float_feature():
    F = _tfds().features
    return F.Tensor(shape=(), dtype=np.float64, encoding=F.Encoding.BYTES)


def features(kind: str):
    """A new ``tfds.features.FeaturesDict`` of a kind (what ``features.json`` declares)."""
    F = _tfds().features
    spec = {}
    for f in schema.SCHEMAS[kind]:
        if f.type == schema.INT:
            spec[f.name] = F.Scalar(np.int64)
        elif f.type == schema.STR:
            spec[f.name] = F.Text()
        elif f.type == schema.INT_LIST:
            spec[f.name] = F.Tensor(shape=(None,), dtype=np.int64)
        elif f.type == schema.FLOAT:
            spec[f.name] = _float_feature()
        elif f.type == schema.STRUCT:
            spec[f.name] = F.FeaturesDict({s: _float_feature() for s in f.subfields})
        else:  # pragma: no cover
            raise AssertionError(f.type)
    return F.FeaturesDict(spec)


def _pb():
    from tensorflow_datasets.proto import tf_example_pb2  # noqa: PLC0415

    return tf_example_pb2


_PACK_D = struct.Struct("<d").pack
_UNPACK_D = struct.Struct("<d").unpack


class RecordEncoder:
    """Validated row -> serialized ``tf.train.Example`` bytes, as TFDS would write it."""

    def __init__(self, kind: str):
        self.kind = kind
        self._fields = schema.SCHEMAS[kind]
        self._example_cls = _pb().Example

    def encode(self, row: Mapping[str, Any]) -> bytes:
        ex = self._example_cls()
        fm = ex.features.feature
        for f in self._fields:
            name, t = f.name, f.type
            v = row[name]
            if t == schema.INT:
                fm[name].int64_list.value.append(v)
            elif t == schema.STR:
                fm[name].bytes_list.value.append(v.encode("utf-8"))
            elif t == schema.INT_LIST:
                il = fm[name].int64_list
                il.SetInParent()  # present even when empty
                il.value.extend(v)
            elif t == schema.FLOAT:
                fm[name].bytes_list.value.append(_PACK_D(v))
            else:  # STRUCT
                for sub in f.subfields:
                    fm[f"{name}/{sub}"].bytes_list.value.append(_PACK_D(v[sub]))
        return ex.SerializeToString()


class RecordDecoder:
    """Serialized ``tf.train.Example`` bytes -> row dict of Python / numpy values.

    ``int`` -> int, ``str`` -> str, id list -> ``np.ndarray[int64]``, float -> float,
    struct -> dict of float. Fields are in schema order.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._fields = schema.SCHEMAS[kind]
        self._example_cls = _pb().Example

    def decode(self, data: bytes) -> dict:
        fm = self._example_cls.FromString(data).features.feature
        out = {}
        for f in self._fields:
            name, t = f.name, f.type
            try:
                if t == schema.INT:
                    out[name] = fm[name].int64_list.value[0]
                elif t == schema.STR:
                    out[name] = fm[name].bytes_list.value[0].decode("utf-8")
                elif t == schema.INT_LIST:
                    out[name] = np.array(fm[name].int64_list.value, dtype=np.int64)
                elif t == schema.FLOAT:
                    out[name] = _UNPACK_D(fm[name].bytes_list.value[0])[0]
                else:
                    out[name] = {s: _UNPACK_D(fm[f"{name}/{s}"].bytes_list.value[0])[0]
                                 for s in f.subfields}
            except (IndexError, struct.error) as e:
                raise ValueError(f"{dataset_name(self.kind)} record: field {name!r} is missing or "
                                 f"malformed ({e})") from None
        return out


def to_json_row(record: Mapping[str, Any]) -> dict:
    """A decoded record (from ``RecordDecoder`` or TFDS) as plain JSON-able Python values."""
    out = {}
    for k, v in record.items():
        if isinstance(v, Mapping):
            out[k] = to_json_row(v)
        elif isinstance(v, np.ndarray):
            out[k] = v.tolist()
        elif isinstance(v, bytes):
            out[k] = v.decode("utf-8")
        elif isinstance(v, np.generic):
            out[k] = v.item()
        else:
            out[k] = v
    return out
