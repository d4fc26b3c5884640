"""X-ray-safe training augmentation (`--augment`): small rotation, isotropic scale, translation, brightness and contrast.

There is deliberately no horizontal flip, and no way to configure one. A chest film is not left-right symmetric and
its report is not either: the heart and the aortic knob are on the patient's left, the liver dome under the right
hemidiaphragm, and reports say "left pleural effusion", "right upper lobe nodule". A mirrored film paired with the
unmirrored report teaches the model to guess the side. (Generic pipelines often add `RandomHorizontalFlip`, e.g.
R2Gen's; this module does not.) Every transform here is a rotation by a small angle, a positive isotropic scale and
a small shift, so the image's orientation is kept (the affine map's determinant is the scale squared, always > 0)
and what is on the left stays on the left.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from processing_xraycap import load_image

# Hard limits, beyond which a "small" transform stops being one: a rotation near 180 degrees would put the heart on
# the image's other side (a point reflection), a shift of a quarter of the width moves lung fields across the
# midline, and a scale <= 0 mirrors (negative) or erases (zero) the film.
ROTATION_LIMIT = 30.0
TRANSLATION_LIMIT = 0.2
SCALE_LIMITS = (0.5, 2.0)
PHOTOMETRIC_LIMIT = 0.5


class XrayAugmentation:
    """Random, anatomy-preserving changes to one chest X-ray view: applied to the PIL images before the processor.

    The defaults are conservative. Chest X-ray classifiers train with larger changes: torchxrayvision's training
    script (Cohen et al., 2022) defaults to rotations up to 45 degrees, shifts up to 15 % and scales of 0.85-1.15;
    MoCo-CXR (Sowrirajan et al., 2021) rotates up to 10 degrees (and flips, harmless for labels that name no side,
    wrong for reports that do). A report generator has to read finer and side-specific detail (the size of the
    heart, the costophrenic angles at the film's edges), so this keeps to a third of those ranges or less: +-5
    degrees, scale 0.9-1.1, shifts up to 5 % of each side, brightness and contrast +-10 % (the small photometric
    jitter of the same pipelines). Scaling is isotropic and there is no shear, so ratios such as the
    cardiothoracic ratio (what "cardiomegaly" is read from) are kept.

    Brightness and contrast are changed first, then the geometry, so the borders that a rotation or shift uncovers
    stay black (0), like the unexposed border of a film.

    Images in any PIL mode are accepted. An 8-bit grayscale ("L") view, what `dataset_builder` stores, is
    augmented as it is; any other mode (16-bit "I;16", "I", "F", RGB, ...) is first converted to the 8-bit
    luminance the processor itself would compute (`processing_xraycap.load_image`: high-bit-depth images are
    scaled from their own min-max range). Augmenting the 16-bit values instead would be partly undone: the
    processor's min-max scaling cancels a brightness change, and the black borders would become the new minimum.
    The result is always mode "L", the size of the input.

    Randomness: each view's parameters come from a generator keyed on (`seed`, epoch, study row, view), see
    [`generator`]. So the images change every epoch, the same seed gives the same draws whatever the batch
    size, the number of DataLoader workers or processes, and a run resumed mid-epoch sees exactly the images of
    the uninterrupted run; torch's global RNG (dropout's) is never drawn from.

    Args:
        max_rotation (`float`, *optional*, defaults to 5.0):
            Largest rotation in degrees, either way; at most 30.
        scale (`tuple[float, float]`, *optional*, defaults to `(0.9, 1.1)`):
            Range of the isotropic zoom factor (1.0: unchanged); both ends in [0.5, 2.0], never negative.
        max_translation (`float`, *optional*, defaults to 0.05):
            Largest shift, as a fraction of the image's width (horizontally) and height (vertically); at most 0.2.
        brightness (`float`, *optional*, defaults to 0.1):
            Brightness factor drawn from [1 - brightness, 1 + brightness]; at most 0.5.
        contrast (`float`, *optional*, defaults to 0.1):
            Contrast factor drawn from [1 - contrast, 1 + contrast]; at most 0.5.
        seed (`int`, *optional*, defaults to 0):
            The run's seed, the first part of every draw's key.
    """

    def __init__(
        self,
        *,
        max_rotation: float = 5.0,
        scale: tuple[float, float] = (0.9, 1.1),
        max_translation: float = 0.05,
        brightness: float = 0.1,
        contrast: float = 0.1,
        seed: int = 0,
    ):
        if not 0 <= max_rotation <= ROTATION_LIMIT:
            raise ValueError(
                f"max_rotation={max_rotation!r}: give degrees in [0, {ROTATION_LIMIT:g}]; a large rotation moves "
                "the heart towards the other side of the film (180 degrees would swap left and right)."
            )
        low, high = (float(s) for s in scale)
        if not SCALE_LIMITS[0] <= low <= high <= SCALE_LIMITS[1]:
            raise ValueError(
                f"scale={tuple(scale)!r}: give (low, high) with {SCALE_LIMITS[0]} <= low <= high <= "
                f"{SCALE_LIMITS[1]}, e.g. (0.9, 1.1). A negative scale would mirror the film, which the report's "
                "'left' and 'right' forbid."
            )
        if not 0 <= max_translation <= TRANSLATION_LIMIT:
            raise ValueError(
                f"max_translation={max_translation!r}: give a fraction of the image side in [0, "
                f"{TRANSLATION_LIMIT:g}], e.g. 0.05."
            )
        for name, value in (("brightness", brightness), ("contrast", contrast)):
            if not 0 <= value <= PHOTOMETRIC_LIMIT:
                raise ValueError(f"{name}={value!r}: give a value in [0, {PHOTOMETRIC_LIMIT:g}], e.g. 0.1.")
        self.max_rotation = float(max_rotation)
        self.scale = (low, high)
        self.max_translation = float(max_translation)
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.seed = int(seed)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(max_rotation={self.max_rotation}, scale={self.scale}, "
            f"max_translation={self.max_translation}, brightness={self.brightness}, contrast={self.contrast}, "
            f"seed={self.seed})"
        )

    def generator(self, epoch: int, row: int, view: int) -> torch.Generator:
        """The generator of one view's draw in one epoch, keyed on (`seed`, `epoch`, `row`, `view`).

        Args:
            epoch (`int`): the training epoch.
            row (`int`): the study's row index in its split.
            view (`int`): the view's position in the study.
        """
        key = np.random.SeedSequence([self.seed, epoch, row, view]).generate_state(1, dtype=np.uint64)[0]
        return torch.Generator().manual_seed(int(key))

    def sample_parameters(self, size: tuple[int, int], generator: torch.Generator) -> dict[str, Any]:
        """Draws one view's parameters.

        Args:
            size (`tuple[int, int]`): the image's `(width, height)`, for the shift in pixels.
            generator (`torch.Generator`): where to draw from (see [`generator`]).

        Returns:
            `dict` with `angle` (degrees, counter-clockwise), `translate` (`[dx, dy]` pixels), `scale`,
            `brightness` and `contrast` (factors, 1.0: unchanged).
        """
        u = torch.rand(6, generator=generator, dtype=torch.float64).tolist()
        width, height = size
        low, high = self.scale
        return {
            "angle": (2 * u[0] - 1) * self.max_rotation,
            "translate": [
                (2 * u[1] - 1) * self.max_translation * width,
                (2 * u[2] - 1) * self.max_translation * height,
            ],
            "scale": low + u[3] * (high - low),
            "brightness": 1 + (2 * u[4] - 1) * self.brightness,
            "contrast": 1 + (2 * u[5] - 1) * self.contrast,
        }

    @staticmethod
    def apply(image: Image.Image, parameters: dict[str, Any]) -> Image.Image:
        """Applies drawn parameters to one view: brightness and contrast, then the affine map with a black fill.

        Args:
            image (`PIL.Image.Image`): the view, in any mode (converted to 8-bit "L" as the processor would).
            parameters (`dict`): from `sample_parameters`.
        """
        scale, angle = parameters["scale"], parameters["angle"]
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"scale={scale!r}: must be > 0; a scale <= 0 mirrors or erases the film.")
        if not abs(angle) <= ROTATION_LIMIT:
            raise ValueError(
                f"angle={angle!r}: must be within +-{ROTATION_LIMIT:g} degrees; a large rotation moves the heart "
                "towards the other side of the film."
            )
        image = image if image.mode == "L" else load_image(image).convert("L")
        image = F.adjust_brightness(image, parameters["brightness"])
        image = F.adjust_contrast(image, parameters["contrast"])
        return F.affine(
            image,
            angle=parameters["angle"],
            translate=parameters["translate"],
            scale=parameters["scale"],
            shear=[0.0, 0.0],
            interpolation=InterpolationMode.BILINEAR,
            fill=0,
        )

    def __call__(self, image: Image.Image, generator: torch.Generator) -> Image.Image:
        """One randomly augmented copy of a view (8-bit grayscale "L", same size).

        Args:
            image (`PIL.Image.Image`): the view, in any mode.
            generator (`torch.Generator`): where the parameters are drawn from (see [`generator`]).
        """
        return self.apply(image, self.sample_parameters(image.size, generator))
