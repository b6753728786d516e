"""Detection data: the synthetic and street benchmarks, COCO and KITTI readers, augmentation, the LightningDataModule.

Modules are imported explicitly (``from fqn.data.datamodule import DetectionDataModule``) so that using the plain
readers never imports Lightning.
"""
