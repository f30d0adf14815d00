"""What the forked trainers of test_crash.py and test_one_writer.py share: the notebook's code, one CPU
thread, twelve random 64-pixel images, and the settings of a run of a few one-second steps."""
import numpy as np
import torch

from nbloader import load_notebook

SETTINGS = dict(patch_size=16, out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16, batch_size=4,
                n_local_crops=2, max_train_images=0, warmup_epochs=1, log_every_steps=1,
                save_every_epochs=1, checkpoint_every_steps=1)

nb = load_notebook()
torch.set_num_threads(1)


class Data:
    images = np.random.default_rng(0).integers(0, 256, (12, 3, 64, 64), dtype=np.uint8)
    labels = np.arange(12) % 4

    def __len__(self):
        return 12


def train(cfg):
    nb.train_dino(cfg, Data(), Data(), torch.device("cpu"), progress=False)
