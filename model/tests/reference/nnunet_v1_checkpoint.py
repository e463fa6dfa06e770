"""Oracle for the nnU-Net v1 checkpoint import: builds a network with nnU-Net 1.7.1's own classes
(Generic_UNet as nnUNetTrainerV2.initialize_network builds it, FabiansUNet as
nnUNetTrainerV2_ResencUNet does), trains it one SGD step so that its weights and the optimizer
state are not the initial ones, saves the checkpoint dict of NetworkTrainer.save_checkpoint
(numpy scalars in the curves included) with torch.save, and writes an input with nnU-Net's
outputs on it.

  python nnunet_v1_checkpoint.py tiny|resenc CLASSES CHECKPOINT IO.safetensors
"""
import sys

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from nnunet.network_architecture.generic_UNet import Generic_UNet
from nnunet.network_architecture.generic_modular_residual_UNet import FabiansUNet
from nnunet.network_architecture.generic_modular_UNet import get_default_network_config
from nnunet.network_architecture.initialization import InitWeights_He


def tiny(classes, channels):
    """fedtalent's `tiny` preset: widths 8, 16, 32, 48; strides 2, 2, (1, 2, 2); 2 convs per stage."""
    pools = [[2, 2, 2], [2, 2, 2], [1, 2, 2]]
    kernels = [[3, 3, 3]] * 4
    net = Generic_UNet(channels, 8, classes, len(pools), 2, 2, nn.Conv3d, nn.InstanceNorm3d, {'eps': 1e-5, 'affine': True},
                       nn.Dropout3d, {'p': 0, 'inplace': True}, nn.LeakyReLU, {'negative_slope': 1e-2, 'inplace': True},
                       True, False, lambda x: x, InitWeights_He(1e-2), pools, kernels, False, True, True,
                       max_num_features=48)
    return net, (2, channels, 16, 32, 32)


def resenc(classes, channels):
    """fedtalent's `resenc` preset (MultiTalent's residual-encoder U-Net)."""
    pools = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    kernels = [[1, 3, 3]] + [[3, 3, 3]] * 5
    cfg = get_default_network_config(3, None, norm_type="in")
    net = FabiansUNet(channels, 30, (1, 2, 3, 4, 4, 4), 2, pools, kernels, cfg, classes, (1, 1, 1, 1, 1), True, False, 320,
                      InitWeights_He(1e-2))
    return net, (1, channels, 32, 64, 64)


def outputs(net, x):
    out = net(x)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def main():
    preset, classes, checkpoint, io_file = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    channels = int(sys.argv[5]) if len(sys.argv) > 5 else 1  # input channels (modalities)
    torch.manual_seed(0)
    net, shape = {"tiny": tiny, "resenc": resenc}[preset](classes, channels)
    # nnUNetTrainerV2's optimizer, one step on a random target: weights (norm affines too) and
    # momentum buffers are no longer their initial values.
    optimizer = torch.optim.SGD(net.parameters(), 0.01, weight_decay=3e-5, momentum=0.99, nesterov=True)
    x = torch.randn(shape)
    loss = sum(((o - torch.rand_like(o)) ** 2).mean() for o in outputs(net, x))
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    # NetworkTrainer.save_checkpoint's dict, as nnU-Net 1.7.1 writes it.
    state_dict = net.state_dict()
    for key in state_dict.keys():
        state_dict[key] = state_dict[key].cpu()
    save_this = {
        'epoch': 1000,
        'state_dict': state_dict,
        # save_checkpoint(save_optimizer=False) for the large network: the file stays small
        'optimizer_state_dict': optimizer.state_dict() if preset == "tiny" else None,
        'lr_scheduler_state_dict': None,
        'plot_stuff': ([0.5, 0.25], [np.float64(0.4), np.float64(0.3)], [], [np.mean([0.7, 0.8])]),
        'best_stuff': (999, np.float64(-0.3), np.float64(0.75)),
        'amp_grad_scaler': {'scale': 65536.0, 'growth_factor': 2.0, 'backoff_factor': 0.5, 'growth_interval': 2000,
                            '_growth_tracker': 17},
    }
    torch.save(save_this, checkpoint)
    net.eval()
    with torch.no_grad():
        outs = outputs(net, x)
    save_file({"x": x.contiguous(), **{f"out{i}": o.contiguous() for i, o in enumerate(outs)}}, io_file)
    print(len(outs))


if __name__ == "__main__":
    main()
