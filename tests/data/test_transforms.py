"""TrainAugment: boxes follow the image, labels follow the boxes, DataLoader workers get their own streams."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from fqn.data.transforms import TrainAugment

W, H = 50, 30


def sample(boxes: list[list[float]], labels: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    image = torch.rand(3, H, W, generator=torch.Generator().manual_seed(0))
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
              "labels": torch.tensor(labels, dtype=torch.int64), "image_id": torch.tensor(42)}
    return image, target


def test_hflip_maps_x_to_width_minus_x():
    image, target = sample([[2.0, 3.0, 12.0, 8.0], [30.5, 0.0, 50.0, 30.0]], [3, 1])
    out_image, out = TrainAugment(hflip=1.0, color=False, seed=0)(image, target)
    expected = torch.tensor([[W - 12.0, 3.0, W - 2.0, 8.0], [0.0, 0.0, W - 30.5, 30.0]])
    torch.testing.assert_close(out["boxes"], expected, atol=1e-4, rtol=0)
    assert out["labels"].tolist() == [3, 1] and out["labels"].dtype == torch.int64
    assert out["boxes"].dtype == torch.float32 and out["image_id"].item() == 42
    assert out_image.dtype == torch.float32 and out_image.shape == (3, H, W)
    torch.testing.assert_close(out_image, image.flip(-1))
    assert torch.equal(target["boxes"][0], torch.tensor([2.0, 3.0, 12.0, 8.0]))  # the input is not modified


def test_box_pushed_out_by_affine_is_dropped_with_its_label():
    image, target = sample([[5.0, 5.0, 15.0, 15.0], [35.0, 5.0, 48.0, 20.0], [20.0, 10.0, 30.0, 20.0]], [1, 2, 3])
    shift = {"translate_px": {"x": 25, "y": 0}, "p": 1.0}
    out_image, out = TrainAugment(hflip=0.0, color=False, affine=shift, seed=0)(image, target)
    # +25 px: the first box moves whole, the second leaves the 50 px image, the third keeps 5/10 (> 0.3) clipped
    torch.testing.assert_close(out["boxes"], torch.tensor([[30.0, 5.0, 40.0, 15.0], [45.0, 10.0, 50.0, 20.0]]),
                               atol=1e-3, rtol=0)
    assert out["labels"].tolist() == [1, 3]
    torch.testing.assert_close(out_image[:, :, 25:], image[:, :, :25], atol=1e-5, rtol=0)


def test_no_boxes_and_color_jitter_stay_valid():
    image, target = sample([], [])
    aug = TrainAugment(hflip=0.5, color=True, affine=True, seed=1)
    for _ in range(5):
        out_image, out = aug(image, target)
        assert out["boxes"].shape == (0, 4) and out["boxes"].dtype == torch.float32
        assert out["labels"].shape == (0,) and out["labels"].dtype == torch.int64
        assert 0 <= out_image.min() <= out_image.max() <= 1 and out_image.shape == (3, H, W)


def test_seeded_and_reproducible():
    image, target = sample([[5.0, 5.0, 15.0, 15.0]], [1])
    runs = [[TrainAugment(seed=7)(image, target)[0] for _ in range(4)] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


class _Same(Dataset):
    """The same sample over and over, so any difference between items is the augmentation's."""

    def __init__(self, aug: TrainAugment) -> None:
        self.aug, self.item = aug, sample([[5.0, 5.0, 15.0, 15.0]], [1])

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int):
        return self.aug(*self.item)[1]["boxes"][0, 0].item()


def _flips(seed: int) -> list[float]:
    loader = DataLoader(_Same(TrainAugment(color=False, seed=0)), batch_size=1, num_workers=2,
                        generator=torch.Generator().manual_seed(seed))
    return [round(b.item()) for b in loader]  # x1 is 5 unflipped, 35 flipped


def test_workers_do_not_repeat_each_others_augmentation():
    flips = _flips(0)
    assert set(flips) == {5, 35}
    assert flips[0::2] != flips[1::2]  # items 0, 2, ... come from worker 0, items 1, 3, ... from worker 1
    assert _flips(0) == flips  # yet reproducible given the loader's seed
