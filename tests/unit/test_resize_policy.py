"""The resize policy (crop, fit, pad): where it is resolved from, how it splits chunks, and that the
resize stage honours it."""

from __future__ import annotations

import numpy as np
from PIL import Image

from kits.helpers import stage_plan
from schemas.job import (
    Defaults,
    Img2ImgStage,
    Item,
    ResizePolicy,
    ResizeStage,
    ResolvedParams,
    resolve_params,
)
from schemas.messages import ChunkItem, StageInput
from schemas.registry import BUILTIN_MODELS, ResolvedModel
from workers.engine import WorkItem, calls_of
from workers.models import LoadedModel
from workers.stages.common import StageBatch, to_pil
from workers.stages.resize import run_resize

CPU = ResolvedModel(name="cpu", entry=BUILTIN_MODELS["cpu"])


def test_resize_precedence_is_item_then_stage_then_defaults_then_crop() -> None:
    bare, own = Item(id="a"), Item(id="b", resize="fit")
    resize, resize_pad = ResizeStage(type="resize"), ResizeStage(type="resize", resize="pad")
    img2img = Img2ImgStage(type="img2img", model="sd15")
    none, fit = Defaults(), Defaults(resize="fit")

    def policy(item: Item, stage: ResizeStage | Img2ImgStage, defaults: Defaults) -> ResizePolicy:
        return resolve_params(item, stage, defaults).resize

    assert policy(bare, resize, none) == "crop"  # built in: what inputs always got before
    assert policy(bare, resize, fit) == "fit"
    assert policy(bare, resize_pad, fit) == "pad"  # the stage over the defaults
    assert policy(own, resize_pad, none) == "fit"  # the item over the stage
    # Other stages have no policy of their own: item, then defaults, then crop.
    assert policy(bare, img2img, none) == "crop"
    assert policy(bare, img2img, fit) == "fit"
    assert policy(Item(id="c", resize="pad"), img2img, fit) == "pad"
    # Unequal parameters never share a batched call.
    assert resolve_params(bare, resize, none) != resolve_params(own, resize, none)


def test_items_with_different_policies_go_to_different_calls() -> None:
    """A chunk's items are grouped into pipeline calls by their parameters, in manifest order."""
    rows = [
        Item(id="a", image="a.png"),
        Item(id="b", image="b.png", resize="pad"),
        Item(id="c", image="c.png"),
        Item(id="d", image="d.png", resize="crop"),
        Item(id="e", image="e.png"),
    ]
    stage, defaults = ResizeStage(type="resize", resize="fit"), Defaults(size=(16, 16))
    work = [
        WorkItem(
            position=slot,
            slot=slot,
            member=ChunkItem(item=item, input=StageInput(kind="image", uri=item.image)),
            params=resolve_params(item, stage, defaults),
        )
        for slot, item in enumerate(rows)
    ]
    calls = calls_of(work, size=2)
    assert [[w.member.item.id for w in call] for call in calls] == [["a", "c"], ["e"], ["b"], ["d"]]
    assert [call[0].params.resize for call in calls] == ["fit", "fit", "pad", "crop"]


def run(policy: ResizePolicy, image: Image.Image) -> np.ndarray:
    plan = stage_plan({"type": "resize", "resize": policy}, CPU)
    params = ResolvedParams(size=(16, 16), resize=policy)
    batch = StageBatch(prompts=[""], negative_prompts=[None], seeds=[0], images=[image])
    output = run_resize(LoadedModel("cpu", CPU.entry), plan, params, batch)
    assert output.images is not None and output.images.shape == (1, 16, 16, 3)
    pixels: np.ndarray = np.asarray(to_pil(output.images[0]))  # as it is written
    return pixels


def bands(pixels: np.ndarray, row: int, columns: tuple[int, ...]) -> list[list[int]]:
    """The colours at `columns` of `row`, each channel rounded to 0 or 255: the probed pixels sit
    inside a band, but LANCZOS rings a little near its edges."""
    return [[255 if value > 128 else 0 for value in pixels[row, x]] for x in columns]


def test_the_resize_stage_honours_the_policy() -> None:
    # 32x16 in four 8-pixel bands: green, red, blue, yellow. Crop drops the outer bands, fit squeezes
    # all four into the full height, pad keeps all four between black bars.
    image = Image.new("RGB", (32, 16))
    for index, colour in enumerate(((0, 255, 0), (255, 0, 0), (0, 0, 255), (255, 255, 0))):
        image.paste(colour, (8 * index, 0, 8 * index + 8, 16))
    cropped, stretched, padded = run("crop", image), run("fit", image), run("pad", image)
    assert bands(cropped, 8, (2, 13)) == [[255, 0, 0], [0, 0, 255]]
    assert cropped[..., 1].max() < 32, "no green or yellow: the outer bands were cut"
    everything = [[0, 255, 0], [255, 0, 0], [0, 0, 255], [255, 255, 0]]
    for row in (0, 15):  # top to bottom: nothing padded
        assert bands(stretched, row, (2, 6, 9, 13)) == everything
    assert (padded[:4] == 0).all() and (padded[12:] == 0).all(), "black bars above and below"
    assert bands(padded, 8, (2, 6, 9, 13)) == everything
