"""What the forked trainers of test_crash.py and test_one_writer.py share: the notebook's code, one CPU
thread, and a run of tiny_settings's twelve images."""
import torch

from nbloader import load_notebook
from tiny_settings import Data

nb = load_notebook()
torch.set_num_threads(1)


def train(cfg):
    nb.train_dino(cfg, Data(), Data(), torch.device("cpu"), progress=False)
