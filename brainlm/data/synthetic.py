"""Synthetic parcellated resting-state fMRI with known networks and known phenotype effects.

Why: users can run the whole pipeline (NIfTI -> parcellation -> pretraining -> probing) without
UK Biobank, and tests get a ground truth: the modules and the effects of age, sex and a symptom
score on the dynamics are known, so a downstream model can be checked for finding them.

Generative model for one subject (arrays are [parcels, time]):

* latent sources: a global signal, one source per module, and per parcel a local and a slow
  (40 s) source. Each is an AR(1) process with its time constant in seconds (phi = exp(-TR/tau)),
  so the dynamics do not depend on the TR, scaled so that after the HRF it has unit variance:
  a change of timescale then leaves the amplitude alone.
* neural signal of parcel p: sqrt(w_g) g + sqrt(w_m,p) m_module(p) + sqrt(w_l,p) (S e)_p
  + sqrt(w_s,p) (S s)_p, weights normalised to sum 1 per parcel, S the row-normalised
  exp(-distance / lambda) spatial mixing, all filtered by the canonical double-gamma HRF
  sampled at the TR (one FFT convolution after the mixing, which it commutes with).
  Modules: k-means with 2K clusters on mirrored coordinates (|x|, y, z), the j-th most
  posterior cluster joined with the j-th of the anterior half, so each module is bilateral
  and long-range (like the default mode network's PCC + mPFC) rather than a spatial blob.
* white measurement noise, variance per volume ~ TR^-0.5 (between thermal averaging, 1/TR, and
  TR-independent physiological noise; it keeps lag-1 and band power in range at TR 0.735 and 2),
  a linear + quadratic drift, all scaled to ~0.3 % of a per-parcel baseline near 10,000.

Phenotype effects (sizes in `SyntheticCohort.effects` and ground_truth.json): age lowers the
within-module coupling weight and raises the global one (less segregated networks with age),
sex decides which module pairs are coupled (two pairs in M, two others in F) and males have a
larger amplitude in one module, and the symptom score lengthens one module's time constant.
Age and sex are strong on purpose: they are positive controls (POSITIVE_CONTROLS) that FC + a
linear model must find on the demo cohort, so a pipeline that cannot is visibly broken.
Subject i is drawn from `default_rng([seed, i])` alone, so a subject does not depend on the
cohort size. Writing a cohort as BIDS-like NIfTI (`write_bids`, `coarse_grid`) is in
`brainlm.data.synthetic_bids`; both names are importable from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from scipy import fft as sp_fft
from scipy import signal as sps
from scipy.linalg import toeplitz
from scipy.spatial.distance import cdist
from scipy.special import gammaln

from ..errors import ConfigError
from .synthetic_bids import coarse_grid, write_bids  # the BIDS writer, importable from here

__all__ = ["DEMO_DESIGN", "POSITIVE_CONTROLS", "REFERENCE_AGE", "SimParams", "SyntheticCohort",
           "canonical_hrf", "coarse_grid", "describe_effects", "make_modules",
           "signal_statistics", "simulate_cohort", "with_new_wave", "write_bids"]

REFERENCE_AGE = 50.0


@dataclass(frozen=True)
class SimParams:
    """Generator constants. Defaults give A424-like statistics at TR 0.735 s and 2.0 s."""

    tau_global: float = 2.0  # s, AR time constants of the latent sources
    tau_module: float = 2.0
    tau_local: float = 1.5
    tau_slow: float = 40.0  # slow parcel-specific fluctuations (the 1/f-like low end)
    # variance weights of the neural signal at the reference age, normalised to sum 1 per parcel
    w_global: float = 0.33
    w_module: float = 0.3  # within-module coupling
    w_local: float = 0.2  # spatially mixed parcel-specific activity
    w_slow: float = 0.2
    w_global_logsd: float = 0.1  # between-subject variability of the global weight
    module_loading_range: float = 0.3  # per-parcel module loading in 1 +- this
    spatial_lambda_mm: float = 10.0  # length scale of the distance-based mixing
    noise_var: float = 0.38  # white-noise variance per volume at TR 0.735 s (neural variance 1)
    noise_tr_exponent: float = 0.5  # noise variance ~ TR^-exponent (1 = pure thermal averaging)
    amplitude: float = 0.0026  # neural std as a fraction of baseline
    amplitude_logsd: float = 0.15  # between-subject variability of the amplitude
    module_amp_logsd: float = 0.08  # nuisance variability of each module's amplitude
    drift_linear: float = 1.5  # sd of the linear drift (end-to-end, in units of neural std)
    drift_quadratic: float = 0.15  # sd of the Legendre-P2 drift (shared + parcel-specific)
    baseline: float = 10000.0
    baseline_rel_sd: float = 0.05
    # phenotype effects: deliberately strong (the cohort is a positive control: FC + a linear
    # model must find age and sex in 40 training subjects of 2.5 min, see POSITIVE_CONTROLS);
    # directions follow the literature, sizes are larger than real cohorts show
    age_range: tuple[float, float] = (20.0, 80.0)
    age_coupling_per_decade: float = -0.25  # relative change of w_module per decade of age
    age_global_per_decade: float = 0.25  # relative change of w_global per decade of age
    sex_module: int = 1
    sex_amplitude_ratio: float = 1.25  # amplitude of sex_module in M relative to F
    # between-module coupling by sex: in each pair (a, b) module a's source becomes
    # sqrt(1 - c) own + sqrt(c) b's, so the two sources correlate sqrt(c) (0 in the other sex)
    sex_between_coupling: float = 0.4
    sex_pairs_m: tuple[tuple[int, int], ...] = ((0, 6), (1, 3))  # coupled in M only
    sex_pairs_f: tuple[tuple[int, int], ...] = ((4, 5), (3, 0))  # coupled in F only
    symptom_module: int = 2
    symptom_log_tau: float = 0.6  # log(tau) of symptom_module per unit of symptom score


# The promise the synthetic cohort makes (stated in ground_truth.json, checked by
# brainlm.evaluate.controls): on the demo design (DEMO_DESIGN) FC + linear (FCBaseline) reaches
# these test scores with a 95 % subject-bootstrap interval whose lower bound is above `chance`.
# Effect sizes were chosen on cohorts with seeds 100-109, not on the seeds 0-9 they are checked
# on (benchmarks/control_sweep.py; the demo runs seed 0).
POSITIVE_CONTROLS = {
    "age": {"task": "regression", "method": "fc_linear", "metric": "r2", "threshold": 0.5,
            "chance": 0.0},
    "sex": {"task": "classification", "method": "fc_linear", "metric": "roc_auc",
            "threshold": 0.8, "chance": 0.5},
}
DEMO_DESIGN = ("demo profile: 80 subjects x 200 TRs of 0.735 s, split 0.5/0.2/0.3 by subject "
               "(40 train, 16 validation, 24 test), robust-scaled")


@dataclass
class SyntheticCohort:
    """Raw intensities and the truth they were made from.

    `signals` [N, P, T] float32; `participants` one row per subject (participant_id, age, sex,
    symptom); `modules` [P] ground-truth module per parcel; `effects` JSON-serialisable effect
    sizes and generator parameters; `truth` the per-subject latent parameters behind the effects.
    """

    signals: np.ndarray
    participants: pd.DataFrame
    modules: np.ndarray
    effects: dict
    tr: float = 0.735
    seed: int = 0
    truth: pd.DataFrame = field(default_factory=pd.DataFrame)
    draws: list | None = None  # per subject (seed, index) it was drawn from; None: (seed, i)

    @property
    def n_subjects(self) -> int:
        return self.signals.shape[0]


# ----------------------------------------------------------------------------- building blocks


def canonical_hrf(tr: float, length_s: float = 32.0) -> np.ndarray:
    """SPM-style double gamma (peak ~5 s, undershoot ~15 s, ratio 1/6) sampled at the TR."""
    t = np.arange(0.0, length_s + 1e-9, tr)
    t[0] = 1e-12  # t**a at 0 in log space

    def gpdf(a):
        return np.exp((a - 1) * np.log(t) - t - gammaln(a))

    h = gpdf(6.0) - gpdf(16.0) / 6.0
    h[0] = 0.0
    return h / h.sum()


def make_modules(coords: np.ndarray, n_modules: int = 7) -> np.ndarray:
    """Bilateral long-range modules: 2K k-means clusters on (|x|, y, z), paired posterior-anterior.

    Mirroring makes each cluster bilateral; pairing the j-th most posterior cluster with the
    j-th of the anterior half makes each module span distant regions (like DMN's PCC + mPFC),
    so module structure is not just the spatial smoothness. Depends only on the coordinates.
    """
    coords = np.asarray(coords, dtype=np.float64)
    mirrored = np.column_stack([np.abs(coords[:, 0]), coords[:, 1], coords[:, 2]])
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=2 * n_modules, n_init=4, random_state=12345).fit(mirrored)
    assign, centers = km.labels_, km.cluster_centers_
    order = np.lexsort((centers[:, 0], centers[:, 2], centers[:, 1]))  # by y, stable
    cluster_module = np.empty(2 * n_modules, dtype=np.int64)
    cluster_module[order[:n_modules]] = np.arange(n_modules)
    cluster_module[order[n_modules:]] = np.arange(n_modules)
    return cluster_module[assign]


def _spatial_mixing(coords: np.ndarray, lam: float) -> np.ndarray:
    """exp(-d/lambda) with unit-norm rows, so each mixed local source keeps unit variance."""
    d = cdist(coords, coords)
    m = np.exp(-d / lam)
    return m / np.sqrt((m ** 2).sum(1, keepdims=True))


def _filtered_var(h: np.ndarray, phi: float) -> float:
    """Variance of HRF-filtered AR(1) with unit innovations: h' Toeplitz(phi^|k| / (1-phi^2)) h."""
    gamma = phi ** np.arange(len(h)) / (1.0 - phi ** 2)
    return float(h @ toeplitz(gamma) @ h)


def _ar_sources(rng, taus: np.ndarray, hrf: np.ndarray, tr: float, n_total: int) -> np.ndarray:
    """AR(1) series, one per row of `taus`, scaled so that each has unit variance once filtered
    by the HRF (the filter is applied later, after the linear mixing it commutes with)."""
    phis = np.exp(-tr / taus)
    eps = rng.standard_normal((len(taus), n_total))
    start = rng.standard_normal((len(taus), 1))  # stationary initial state: no AR burn-in
    out = np.empty_like(eps)
    for phi in np.unique(phis):  # lfilter takes one filter per call: group equal timescales
        rows = phis == phi
        gain = 1.0 / np.sqrt(_filtered_var(hrf, phi))
        zi = phi * gain / np.sqrt(1.0 - phi ** 2) * start[rows]
        out[rows] = sps.lfilter([gain], [1.0, -phi], eps[rows], axis=1, zi=zi)[0]
    return out


def _apply_hrf(x: np.ndarray, hrf: np.ndarray) -> np.ndarray:
    """Causal convolution along time by FFT (same length as x)."""
    n = x.shape[1]
    nfft = sp_fft.next_fast_len(n + len(hrf) - 1, real=True)
    spec = sp_fft.rfft(x, nfft, axis=1) * sp_fft.rfft(hrf, nfft)[None, :]
    return sp_fft.irfft(spec, nfft, axis=1)[:, :n]


def _legendre_drift(n_time: int) -> tuple[np.ndarray, np.ndarray]:
    u = np.linspace(-1.0, 1.0, n_time)
    return u, 0.5 * (3 * u ** 2 - 1)


# ----------------------------------------------------------------------------- the cohort


def _phenotypes(rng, p: SimParams) -> tuple[float, str, float]:
    age = round(float(rng.uniform(*p.age_range)), 1)
    sex = "M" if rng.random() < 0.5 else "F"
    symptom = round(float(rng.standard_normal()), 3)
    return age, sex, symptom


def _pairs(pairs, n_mod: int) -> list[tuple[int, int]]:
    """Module pairs taken modulo the module count; a pair that falls on one module is dropped."""
    out = [(int(a) % n_mod, int(b) % n_mod) for a, b in pairs]
    return [(a, b) for a, b in out if a != b]


def _simulate_subject(rng, pheno, modules, n_mod, mixing, hrf, tr, n_time, p: SimParams):
    """One recording [P, T] of raw intensities, and the latent parameters behind the effects."""
    age, sex, symptom = pheno
    n_parcels = len(modules)
    # subject-level parameters: the effects, then nuisance variability
    decades = (age - REFERENCE_AGE) / 10
    w_mod = p.w_module * max(0.0, 1.0 + p.age_coupling_per_decade * decades)
    w_glob = p.w_global * max(0.0, 1.0 + p.age_global_per_decade * decades) * \
        np.exp(p.w_global_logsd * rng.standard_normal())
    taus = np.full(1 + n_mod + 2 * n_parcels, p.tau_local)
    taus[1 + n_mod + n_parcels:] = p.tau_slow
    taus[0] = p.tau_global
    taus[1:1 + n_mod] = p.tau_module
    sym_mod = p.symptom_module % n_mod
    tau_sym = p.tau_module * np.exp(p.symptom_log_tau * symptom)
    taus[1 + sym_mod] = tau_sym
    amp_mod = np.exp(p.module_amp_logsd * rng.standard_normal(n_mod))
    sex_mod = p.sex_module % n_mod
    if sex == "M":
        amp_mod[sex_mod] *= p.sex_amplitude_ratio
    loading = 1.0 + p.module_loading_range * rng.uniform(-1, 1, n_parcels)
    w_m = w_mod * loading
    total = w_glob + w_m + p.w_local + p.w_slow  # per parcel, so each has unit neural variance
    w_g, w_m, w_l, w_s = w_glob / total, w_m / total, p.w_local / total, p.w_slow / total

    burn = len(hrf)  # the HRF's memory; the AR sources start stationary
    src = _ar_sources(rng, taus, hrf, tr, n_time + burn)
    glob, mod = src[0], src[1:1 + n_mod]
    c = p.sex_between_coupling
    if c > 0:
        mod = mod.copy()
        for a, b in _pairs(p.sex_pairs_m if sex == "M" else p.sex_pairs_f, n_mod):
            mod[a] = np.sqrt(1 - c) * mod[a] + np.sqrt(c) * mod[b]  # still unit variance
    loc, slow = src[1 + n_mod:1 + n_mod + n_parcels], src[1 + n_mod + n_parcels:]
    neural = (np.sqrt(w_g)[:, None] * glob[None, :] + np.sqrt(w_m)[:, None] * mod[modules]
              + np.sqrt(w_l)[:, None] * (mixing @ loc) + np.sqrt(w_s)[:, None] * (mixing @ slow))
    neural = _apply_hrf(neural, hrf)[:, burn:] * amp_mod[modules][:, None]

    noise_var = p.noise_var * (0.735 / tr) ** p.noise_tr_exponent
    noise = np.sqrt(noise_var) * rng.standard_normal((n_parcels, n_time))
    u1, u2 = _legendre_drift(n_time)
    a1 = p.drift_linear / 2 * rng.standard_normal(n_parcels)
    a2 = p.drift_quadratic * (rng.standard_normal() + rng.standard_normal(n_parcels)) / np.sqrt(2)
    drift = a1[:, None] * u1[None, :] + a2[:, None] * u2[None, :]

    amp = p.amplitude * np.exp(p.amplitude_logsd * rng.standard_normal())
    baseline = p.baseline * (1.0 + p.baseline_rel_sd * rng.standard_normal(n_parcels))
    x = baseline[:, None] * (1.0 + amp * (neural + noise + drift))
    truth = {"w_global": float(w_glob), "w_module": float(w_mod),
             "tau_symptom_module_s": float(tau_sym), "amp_sex_module": float(amp_mod[sex_mod]),
             "amplitude": float(amp)}
    return x.astype(np.float32), truth


def simulate_cohort(coords, n_subjects: int, n_timepoints: int, tr: float = 0.735,
                    seed: int = 0, n_modules: int = 7,
                    params: SimParams | None = None) -> SyntheticCohort:
    """Simulate `n_subjects` recordings [P, T] for parcels at `coords` (MNI mm, [P, 3]).

    Subject i is drawn from default_rng([seed, i]) alone, so it is the same in any cohort size.
    """
    p = params or SimParams()
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 3:
        raise ConfigError(f"coords must be [parcels, 3] MNI mm, got shape {coords.shape}")
    if n_modules < 1 or coords.shape[0] < 2 * n_modules:
        raise ConfigError(f"{coords.shape[0]} parcels cannot hold {n_modules} modules "
                          "(need at least 2 parcels per module)")
    if n_subjects < 1 or n_timepoints < 2:
        raise ConfigError(f"need n_subjects >= 1 and n_timepoints >= 2, got {n_subjects}, "
                          f"{n_timepoints}")
    if not tr > 0:
        raise ConfigError(f"tr must be positive, got {tr}")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")

    modules = make_modules(coords, n_modules)
    mixing = _spatial_mixing(coords, p.spatial_lambda_mm)
    hrf = canonical_hrf(tr)
    width = max(3, len(str(n_subjects)))
    signals = np.empty((n_subjects, coords.shape[0], n_timepoints), dtype=np.float32)
    rows, truths = [], []
    for i in range(n_subjects):
        rng = np.random.default_rng([seed, i])
        pheno = _phenotypes(rng, p)
        signals[i], truth = _simulate_subject(rng, pheno, modules, n_modules, mixing, hrf, tr,
                                              n_timepoints, p)
        pid = f"sub-{i + 1:0{width}d}"
        rows.append({"participant_id": pid, "age": pheno[0], "sex": pheno[1],
                     "symptom": pheno[2]})
        truths.append({"participant_id": pid, **truth})
    return SyntheticCohort(signals=signals, participants=pd.DataFrame(rows), modules=modules,
                           effects=describe_effects(p, n_modules), tr=float(tr), seed=int(seed),
                           truth=pd.DataFrame(truths))


def with_new_wave(base: SyntheticCohort, held: dict, wave: int, coords,
                  params: SimParams | None = None) -> SyntheticCohort:
    """`base`'s held-out subjects (val/test ids in `held`, unchanged to the byte) plus a new
    wave of training subjects drawn with seed `base.seed + wave`, as many as it replaces, with
    ids `sub-w<wave>s<NNN>` and `split` = train. What a nightly retrain gets on the demo: new
    training data, the same test subjects (so promotion compares like with like)."""
    if wave < 1:
        raise ConfigError(f"wave must be >= 1 for a new wave, got {wave}")
    pids = base.participants["participant_id"].astype(str).tolist()
    keep = [i for i, pid in enumerate(pids) if pid in held]
    n_new = base.n_subjects - len(keep)
    if n_new < 1:
        raise ConfigError("every subject is held out: no training subject to draw anew")
    new = simulate_cohort(coords, n_new, base.signals.shape[2], tr=base.tr,
                          seed=base.seed + wave, n_modules=int(base.modules.max()) + 1,
                          params=params)
    ids = {old: f"sub-w{wave}s{j + 1:03d}" for j, old in
           enumerate(new.participants["participant_id"])}
    old_rows = base.participants.iloc[keep].assign(wave=0, seed=base.seed)
    old_rows["split"] = [held[pids[i]] for i in keep]
    new_rows = new.participants.replace({"participant_id": ids}).assign(
        wave=wave, seed=base.seed + wave, split="train")
    rows = pd.concat([old_rows, new_rows], ignore_index=True)
    truth = pd.concat([base.truth.iloc[keep], new.truth.replace({"participant_id": ids})],
                      ignore_index=True) if len(base.truth) else new.truth
    draws = [(base.draws or [(base.seed, i) for i in range(base.n_subjects)])[i] for i in keep]
    return SyntheticCohort(
        signals=np.concatenate([base.signals[keep], new.signals]), participants=rows,
        modules=base.modules, effects=base.effects, tr=base.tr, seed=base.seed + wave,
        truth=truth, draws=draws + [(base.seed + wave, j) for j in range(n_new)])


def describe_effects(p: SimParams, n_modules: int) -> dict:
    """The planted effects: what each acts on, its size in plain numbers, how to see it, the
    positive controls it is meant to pass, and every generator constant."""
    lo, hi = p.age_range

    def rel(per_decade, age):
        return round(max(0.0, 1.0 + per_decade * (age - REFERENCE_AGE) / 10), 3)

    c = p.sex_between_coupling
    return {
        "age": {
            "acts_on": "within-module coupling falls and global coupling rises with age (less "
                       "segregated, more global connectivity)",
            "size": f"w_module x{rel(p.age_coupling_per_decade, lo)} at {lo:g} and "
                    f"x{rel(p.age_coupling_per_decade, hi)} at {hi:g} years; w_global "
                    f"x{rel(p.age_global_per_decade, lo)} at {lo:g} and "
                    f"x{rel(p.age_global_per_decade, hi)} at {hi:g} years (x1 at "
                    f"{REFERENCE_AGE:g})",
            "modules": "all",
            "model": "w_module = w0 * (1 + coupling_per_decade * (age - reference_age) / 10), "
                     "w_global likewise with global_per_decade, both before the per-parcel "
                     "normalisation of (w_global, w_module, w_local, w_slow) to sum 1",
            "w0": p.w_module, "per_decade": p.age_coupling_per_decade,
            "global_per_decade": p.age_global_per_decade,
            "reference_age": REFERENCE_AGE,
            "observable": "within-module minus between-module FC decreases with age; mean "
                          "between-module FC increases",
            "sign": -1,
        },
        "sex": {
            "acts_on": "between-module coupling (module pairs coupled in one sex only) and the "
                       "amplitude of one module's neural signal (not the noise) in M",
            "size": f"in each listed pair the two module sources correlate {np.sqrt(c):.3f} "
                    f"(sqrt of the shared variance {c:g}) in one sex and 0 in the other; module "
                    f"{p.sex_module % n_modules} amplitude x{p.sex_amplitude_ratio:g} in M",
            "pairs_coupled_in_M": [list(t) for t in _pairs(p.sex_pairs_m, n_modules)],
            "pairs_coupled_in_F": [list(t) for t in _pairs(p.sex_pairs_f, n_modules)],
            "shared_variance": c,
            "source_correlation": float(np.sqrt(c)),
            "module": p.sex_module % n_modules,
            "ratio_M_over_F": p.sex_amplitude_ratio,
            "observable": "FC between the modules of each pair is higher in the sex that "
                          "couples them; BOLD std of the amplitude module relative to the other "
                          "parcels is larger in M",
            "sign": 1,
        },
        "symptom": {
            "acts_on": "AR time constant of one module's source (slower dynamics)",
            "size": f"tau x{np.exp(p.symptom_log_tau):.3f} per unit of the (standard normal) "
                    f"score, from {p.tau_module:g} s at score 0",
            "module": p.symptom_module % n_modules,
            "model": "tau = tau_module * exp(log_tau_per_unit * symptom)",
            "tau_module_s": p.tau_module, "log_tau_per_unit": p.symptom_log_tau,
            "symptom_distribution": "standard normal score",
            "observable": "autocorrelation at 3-6 s lags of that module's mean signal (after "
                          "removing the global mean) rises with the score; parcel lag-1 barely "
                          "changes at short TR because the HRF dominates it",
            "sign": 1,
        },
        "positive_controls": {
            **{k: {**v, "design": DEMO_DESIGN} for k, v in POSITIVE_CONTROLS.items()},
            "symptom": None,
        },
        "parameters": asdict(p),
    }


# ----------------------------------------------------------------------------- statistics


def signal_statistics(x, tr: float) -> dict:
    """What says whether a recording x [P, T] looks like resting-state BOLD, after linear
    detrending of each parcel: lag-1 autocorrelation (mean over parcels), mean and SD of the
    off-diagonal FC, the global signal's share of variance (mean over parcels of r^2 with the
    parcel-mean signal) and the 0.01-0.1 Hz share of power."""
    x = sps.detrend(np.asarray(x, dtype=np.float64), axis=1, type="linear")
    x = x[x.std(axis=1) > 0]
    n, t = x.shape
    z = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
    lag1 = float(np.mean((z[:, 1:] * z[:, :-1]).sum(1) / (z ** 2).sum(1)))
    off = ((z @ z.T) / t)[~np.eye(n, dtype=bool)]
    g = z.mean(0)
    g = (g - g.mean()) / g.std()
    power = np.abs(np.fft.rfft(x, axis=1)) ** 2
    freqs = np.fft.rfftfreq(t, d=tr)
    band = (freqs >= 0.01) & (freqs <= 0.1)
    return {"lag1": lag1,
            "mean_fc": float(off.mean()) if n > 1 else float("nan"),
            "fc_sd": float(off.std()) if n > 1 else float("nan"),
            "gs_share": float(np.mean(((z @ g) / t) ** 2)),
            "band_power": float(np.mean(power[:, band].sum(1) / power[:, 1:].sum(1)))}
