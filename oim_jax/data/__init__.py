"""Datasets (CUHK-SYSU, PRW, synthetic) and the input pipeline."""

from oim_jax.data.dataset import GalleryEntry, ImageAnnotation, Query, SearchDataset
