"""Detection data: the embedded synthetic set, COCO and KITTI readers, augmentation and the LightningDataModule.

Modules are imported explicitly (``from fqn.data.datamodule import DetectionDataModule``) so that using the plain
readers never imports Lightning.
"""
