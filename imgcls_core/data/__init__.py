"""Data loading: image decoding, dataset sources, Parquet shards and the digits data set."""

from imgcls_core.data.digits import materialize_digits
from imgcls_core.data.records import (
    CorruptImageError,
    DatasetSplits,
    ImageTooLargeError,
    SkippedImageWarning,
    SplitRecords,
    decode_image,
)
from imgcls_core.data.shards import (
    ConversionReport,
    convert_image_folder,
    load_class_index,
    read_shard_table,
    write_shards,
)
from imgcls_core.data.sources import (
    UnsafePickleError,
    build_weighted_sampler,
    class_weights,
    load_dataset,
    stratified_split,
)
from imgcls_core.data.stats import IMAGENET_MEAN, IMAGENET_STD, compute_mean_std

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ConversionReport",
    "CorruptImageError",
    "DatasetSplits",
    "ImageTooLargeError",
    "SkippedImageWarning",
    "SplitRecords",
    "UnsafePickleError",
    "build_weighted_sampler",
    "class_weights",
    "compute_mean_std",
    "convert_image_folder",
    "decode_image",
    "load_class_index",
    "load_dataset",
    "materialize_digits",
    "read_shard_table",
    "stratified_split",
    "write_shards",
]
