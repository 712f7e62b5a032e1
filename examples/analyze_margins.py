# %% [markdown]
# # Margins, q and noise: NaPO's analysis on the embedded sample
#
# Offline, top to bottom: a tiny random LLaVA and the bundled sample set, the biased answers it
# writes (RLAIF-V -> RLAIF-V-Bias), the reference log-probs, a short NaPO run, then the paper's
# pictures for this data and run: margin distributions of noisy vs clean pairs (Figure 4), length
# margins (Table 7), q against the margin and against gamma, and q / weights / margins over
# training (Figure 7). The tiny model is random, so the numbers mean nothing; the code is what you
# would run on RLAIF-V-Bias with LLaVA-v1.5. (This file and `analyze_margins.ipynb` hold the same
# cells; run either: `python examples/analyze_margins.py`.)

# %%
import tempfile
from pathlib import Path

import pandas as pd

import napo.analysis as analysis
from napo.data import generate_biased, make_sample_data, make_tiny_model
from napo.train.reference import compute_reference_logps
from napo.train.run import train

work = Path(tempfile.mkdtemp(prefix="napo-analysis-"))
model = make_tiny_model(work / "tiny-llava")
sample = make_sample_data(work / "sample.parquet", rows=16)
generate_biased(model, sample, work / "biased", max_new_tokens=12, num_beams=1, progress=False)
compute_reference_logps(model, work / "biased", work / "scored", progress=False)

# %% [markdown]
# ## The data's own margins
#
# One row per (data row, term). Without a model the margins come from the cached reference
# columns: log p(chosen) - log p(answer) under the reference. Here a made-up noise label marks
# every third row, standing in for a human or heuristic judgement of which biased answers are in
# fact good (noisy pairs).

# %%
data = pd.read_parquet(work / "scored")
labels = {idx: position % 3 == 0 for position, idx in enumerate(sorted(data["idx"]))}
table = analysis.margins(data, noise_labels=labels)
print(table.head(6).to_string())
print(analysis.markdown_table(analysis.summarize(table)))

# %%
analysis.plot_margin_hist(table)

# %%
analysis.plot_margin_hist(table, kind="length_margin")

# %%
analysis.plot_q_curve(table)

# %% [markdown]
# ## A short NaPO run, and its curves

# %%
config = {"max_steps": 8, "per_device_train_batch_size": 4, "logging_steps": 1, "learning_rate": 1e-3}
run = train(model, work / "scored", work / "run", config=config, progress=False, print_table=False)
analysis.plot_training_curves(run)

# %% [markdown]
# ## The trained policy's margins, and the pairs NaPO treats as most likely noisy
#
# Scoring the trained model against the cached reference gives the reward margins of Eq. 2; NaPO's
# gradient on a pair is DPO's times sigmoid(beta * M) ** q, so the lowest margins are down-weighted most.

# %%
trained = analysis.margins(data, model=run, noise_labels=labels)
ranking = analysis.noise_ranking(trained, "language", top=5)
print(ranking[["rank", "idx", "noise", "reward_margin", "avg_reward_margin", "napo_weight"]].to_string())
analysis.plot_margin_hist(trained)

# %%
report = analysis.analyze(work / "scored", work / "report", run=run, noise_labels=None, progress=False)
print(report.read_text()[:400])
print(f"everything is under {work}")
