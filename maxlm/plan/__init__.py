"""`maxlm plan`: turn a compute budget into a runnable config, and fit scaling laws from the user's own runs.

The loop it closes: budget -> plan (`planner`) -> config -> `maxlm train` -> `fit` -> a better law -> plan again;
`sweep` writes the IsoFLOP runs that feed the fit. One job per module:

- `laws`: the parametric loss laws and their compute-optimal allocation (closed form and numeric);
- `hparams`: batch size and learning rate from the DeepSeek LLM fits, warmup;
- `shape`: a Llama-style decoder shape whose exact parameter count (by `maxlm.flops`) hits a target;
- `memory`: bytes per chip (params, grads, Adam, activations under the remat policy) and the smallest mesh;
- `planner`: puts the above together into a `Plan` and turns it into a `Config`; `report`: the readable table;
- `fit`: Huber fit of the law (Hoffmann et al. Approach 3), bootstrap intervals, IsoFLOP parabolas;
- `sweep`: IsoFLOP sweep configs; `plot`: the IsoFLOP figure; `cli`: the command line.

Planning imports no jax (a plan runs in ~0.1 s, interpreter start included); only `--write-config`'s check and
reading run directories go through `maxlm.config.load_config`, which loads the model's block registry.
"""

from maxlm.plan.laws import BUILTIN_LAWS, ChinchillaLaw, KaplanLaw, Law, load_law
from maxlm.plan.planner import Plan, PlanRequest, make_plan, plan_to_config

__all__ = ["BUILTIN_LAWS", "ChinchillaLaw", "KaplanLaw", "Law", "load_law", "Plan", "PlanRequest", "make_plan",
           "plan_to_config"]
