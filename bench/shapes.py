"""LFM's shapes, the one definition the benchmarks, the ledger and the launch sweep use: channel widths from
the model, sizes and batch from the released recipe (lfm.train.TrainOptions), so none is typed twice."""
from lfm.images import TEST_SIZE
from lfm.model import SCORE_CHANNELS, SNET_CHANNELS, snet_output_size
from lfm.train import TrainOptions
from lfm.weights import DEFAULT_K

IMAGE_SIZE = TEST_SIZE  # 256: images are resized to 256x256 for testing
TRAIN_SIZE = TrainOptions.crop  # 224: the training crop
SIZES = (IMAGE_SIZE, TRAIN_SIZE)
TRAIN_BATCH = TrainOptions.batch_size  # 32
LARGE_BATCH = 256  # a batch that fills a GPU: inference throughput and per-op cases
INFERENCE_BATCHES = (1, TRAIN_BATCH, LARGE_BATCH)
K = DEFAULT_K  # 16 positions per score channel
FEATURE_CHANNELS = SNET_CHANNELS[-1]  # 512: SNet's output, the scoring conv's input
SCORE_GRID = snet_output_size(IMAGE_SIZE, IMAGE_SIZE)  # (30, 30): the score map of a 256x256 image


def snet_block_shapes(side: int) -> dict:
    """{block: (input channels, output channels, input side)} of the SNet blocks for a side x side image:
    each 2x2 conv takes 1 and each pool (blocks 1-3) halves, as in lfm.model.snet_output_size."""
    shapes = {}
    for block, (cin, cout) in enumerate(zip(SNET_CHANNELS[:-1], SNET_CHANNELS[1:]), start=1):
        shapes[block] = (cin, cout, side)
        side = (side - 1) // 2
    return shapes


# {1: (3, 64, 256), 2: (64, 128, 127), 3: (128, 256, 63), 4: (256, 512, 31)}
SNET_BLOCKS = snet_block_shapes(IMAGE_SIZE)
__all__ = ["FEATURE_CHANNELS", "IMAGE_SIZE", "INFERENCE_BATCHES", "K", "LARGE_BATCH", "SCORE_CHANNELS", "SCORE_GRID",
           "SIZES", "SNET_BLOCKS", "SNET_CHANNELS", "TRAIN_BATCH", "TRAIN_SIZE", "snet_block_shapes"]
