# The tests run many tiny models: one thread each is fastest, and does not thrash when other
# processes share the CPU (the two-process torchrun tests set OMP_NUM_THREADS=1 likewise).
import torch

torch.set_num_threads(1)
