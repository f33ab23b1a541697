"""digits-mlp with a frozen first layer of zeros: every hard prune leaves it without a weight."""

import dataclasses

import torch

from constrainedsparse.spec import load_problem

base = load_problem("digits-mlp")


def model(options):
    net = base.model(options)
    with torch.no_grad():
        net[0].weight.zero_()
    net[0].weight.requires_grad_(False)  # nothing trains it back
    return net


problem = dataclasses.replace(base, name="zero-layer", description="digits-mlp, first layer all zeros", model=model)
