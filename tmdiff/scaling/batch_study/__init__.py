"""The batch-size study at small scale: loss flatness across batches, B_crit and gamma.

Is the final loss flat across physical batches with the SDE reparameterisation, where is the
critical batch, and what is gamma?

  python -m tmdiff.scaling.batch_study --out=runs/batch_study --data_dir=runs/data --docs=docs
  python -m tmdiff.scaling.batch_study --out=/tmp/bs --quick    # 3 micro runs (smoke test)

Every run's config is `plan.run_config` (the same as `experiments/batch_study.py:<arg>`, with
<arg> from `Study.arg`), trained by `tmdiff.train.loop.train` in OUT/runs/<name>; a run whose
result.json exists is skipped, an interrupted one resumes from its checkpoint, so the command
can be re-run until it completes. In order:
  1. base tuning: at (B_base, D_base), a sweep of the AdamW values reparameterised by a kappa
     multiplier k (lr*sqrt(k), beta^k, eps/sqrt(k)); the best k is the tuned base k0. The sweep
     grows at an edge that wins (at most --max_extend points per side).
  2. batch grid at D_base with the base k0: each B reparameterised (sde=1: kappa = B/B_base) and
     naive (sde=0: the base values; only the step count D/(L B) changes). The grid grows upward
     (x2) while the reparameterised losses stay within --tol of each other; a new point is
     trained reparameterised under --growth_replicates replicates first and filled out only
     while the grid is still flat.
  3. noise: the whole grid again under --grid_mask_seeds other training-mask seeds
     (replicates; masks keyed per example, --noise); the base retrained with --seeds other
     seeds (init, data order, masks); the base and the smallest-B runs re-evaluated under
     --eval_seeds other eval-mask seeds; and the smallest-B reparameterised run again with
     gradient clipping (--clip_control; the study itself trains without clipping).
  4. gamma: k sweeps at B_base for the other horizons (--horizons x D_base), centred on the
     optimum --gamma_guess predicts (k0 (D_base/D)^gamma_guess x --horizon_kappas; grown at a
     winning edge), so that the fit, not the grid, decides.
Every run's final eval is on the same validation rows with the same per-row masks
(`eval_rows`, tmdiff.eval.elbo), so losses are comparable across batches.

Analysis (analysis.py, tested in tests/test_batch_study.py):
  flat level  mean reparameterised loss over B <= B_base;
  B_crit      the flat set is the points up to B_base, then each larger B while the set's
              spread stays within --tol; B_crit interpolates in log B where the spread reaches
              --tol, between the last point in the set and the first outside;
              S_crit = D / (L B_crit);
  spread      (max - min) / mean of final losses over the grid points below B_crit (a point's
              loss: the mean over its replicates);
  noise       the two-way residual of ln loss over (grid point, replicate): one run's noise
              against the other runs of its replicate;
  verdict     the spread against the tolerance; naive against reparameterised at the same B
              and replicate (the same batches and masks), ln(naive / reparam) averaged over the
              Bs below B_crit other than B_base, a paired t test over the replicates (95%);
  gamma       per horizon D, a parabola in ln k through the best point and up to two neighbours
              each side gives k*(D); gamma = -slope of ln k* vs ln D (kappa = (D_base/D)^gamma at
              B_base); uncertainty by a parametric bootstrap with the measured seed noise.
Writes OUT/report/: batch_study.md (tables), batch_study.csv (one row per run),
batch_study.json (everything), batch_study.png (loss vs B), batch_study_gamma.png. With
--docs=DIR, also copies the plots to DIR/img/ and replaces the generated block of DIR/batch_study.md.

Modules: plan (Run, Study: the settings), analysis (the statistics), runner (training the runs),
report (CSV, markdown, plots, the docs block), __main__ (the command line).
"""
