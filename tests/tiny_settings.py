"""The settings of a run of a few one-second steps and its twelve random 64-pixel images, without the
notebook: tiny_run's forked trainers use them, and so can a test that trains in the test process (importing
tiny_run would load a second notebook module under the name dino_vit)."""
import numpy as np

SETTINGS = dict(patch_size=16, out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16, batch_size=4,
                n_local_crops=2, max_train_images=0, warmup_epochs=1, log_every_steps=1,
                save_every_epochs=1, checkpoint_every_steps=1)


class Data:
    images = np.random.default_rng(0).integers(0, 256, (12, 3, 64, 64), dtype=np.uint8)
    labels = np.arange(12) % 4

    def __len__(self):
        return 12
