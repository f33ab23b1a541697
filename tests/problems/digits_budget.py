"""digits-mlp plus a constraint of the user's: the first layer's weight norm <= a budget."""

import dataclasses

from constrainedsparse.problem import UserConstraint
from constrainedsparse.spec import load_problem

base = load_problem("digits-mlp")


def first_layer_norm_budget(model):
    return model[0].weight.norm() - 4.0


problem = dataclasses.replace(
    base,
    name="digits-budget",
    description="digits-mlp with ||W_0|| <= 4",
    constraints={"budget": UserConstraint(first_layer_norm_budget, "<=")},
    dual_lr=0.5,
)
