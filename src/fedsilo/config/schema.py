"""The run configuration: typed, frozen, validated sections of one TOML file.

Every field has a default, so an empty file is a valid (tiny) run; unknown keys are errors,
because a misspelt privacy or training key silently falling back to a default is worse than
a refusal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

EngineName = Literal["inprocess", "ray"]
StrategyName = Literal["fedavg", "fedprox", "fedadam"]
PartitionName = Literal["by-chapter", "dirichlet"]
TaskName = Literal["icd10", "drug-review", "shakespeare", "files"]
# How the gold set is scored (docs/benchmarks.md): "code" ICD-10-CM exact match and category,
# "sentiment" rating class and adjacent class, "next-token" teacher-forced top-1 and top-5.
MetricName = Literal["code", "sentiment", "next-token", "exact", "label", "similarity"]
ClusterMethod = Literal["none", "groups", "site", "update-cosine"]
SecureAggregationMode = Literal["none", "secagg", "he"]
# Compute precision of training and evaluation: "auto" takes bf16 where the CPU multiplies
# bf16 matrices natively and measurably faster than fp32 (docs/benchmarks.md), fp32 elsewhere.
PrecisionSetting = Literal["auto", "bf16", "fp32"]
# Whether local training (DP-SGD included) runs through torch.compile
# (fedsilo.training.compilation): "auto" where a probe compilation succeeds, "on" insists,
# "off" never.
CompileSetting = Literal["auto", "on", "off"]
DeviceSetting = Literal["cpu", "cuda"]
# Names that become file or folder names (run folders, RUN/sites/NAME, NAME.key, NAME.toml):
# a letter or digit first, so never "." or "..", and no separator.
SafeName = Annotated[
    str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
]


class Section(BaseModel):
    """Base of every section: frozen, no unknown keys."""

    # No float setting may be inf or NaN (pydantic would accept "inf" and "nan").
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


MAX_ROUNDS = 100_000
"""Most rounds a run may plan (also the most a DP task may ask a site to budget for)."""


class RunSection(Section):
    """What to run and how the process behaves."""

    name: SafeName = "fedsilo-run"
    seed: int = 0
    rounds: int = Field(3, ge=1, le=MAX_ROUNDS)
    # On a small machine a multi-threaded torch process slows down sharply as soon as
    # anything else runs; one thread per simulated site is the fast, predictable choice.
    torch_threads: int = Field(1, ge=1, le=1024)
    engine: EngineName = "inprocess"
    # In-process engine: how many simulated sites train at once, each in a thread of its own
    # with its own copy of the model and torch_threads // concurrent_sites torch threads (the
    # server's evaluation keeps torch_threads). Two one-thread sites on two cores train faster
    # than one two-thread site; each copy of the model costs its memory.
    concurrent_sites: int = Field(1, ge=1, le=64)
    # Simulation: a folder with one policy file per site (NAME.toml). A site without its file
    # refuses to train, unless require_site_policies = false says the run is a simulation
    # without policies (then such a site accepts every task). In a deployment each site keeps
    # its policy on its own machine and cannot start without it.
    site_policies: Path | None = None
    require_site_policies: bool = True

    @model_validator(mode="after")
    def _concurrency_in_process(self) -> RunSection:
        if self.concurrent_sites > 1 and self.engine != "inprocess":
            raise ValueError(
                f"concurrent_sites = {self.concurrent_sites} applies to the inprocess engine; "
                f"the {self.engine} engine runs sites by its own resources"
            )
        if self.concurrent_sites > self.torch_threads:
            raise ValueError(
                f"concurrent_sites = {self.concurrent_sites} needs at least as many "
                f"torch_threads (got {self.torch_threads}): each site trains on one or more"
            )
        return self

    @property
    def site_threads(self) -> int:
        """Torch threads of each simulated site while it trains."""
        return self.torch_threads // self.concurrent_sites


class ModelSection(Section):
    """The base model every site fine-tunes."""

    # "smollm2-135m-instruct" (embedded default) or a path to a local Hugging Face folder.
    base: str = "smollm2-135m-instruct"


class LoraSection(Section):
    """LoRA adapter shape; only these tensors are ever trained, saved or sent."""

    rank: int = Field(8, ge=1, le=256)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    # FFA-LoRA: A frozen at the run seed's init, only B trained, sent and averaged (exact).
    ffa: bool = False

    @model_validator(mode="after")
    def _targets_not_empty(self) -> LoraSection:
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")
        return self


class SiteFilesSection(Section):
    """One site's records on disk (used by task name = "files")."""

    name: SafeName
    path: Path


class TaskSection(Section):
    """Which data each site trains on, and the held-out gold set."""

    name: TaskName = "icd10"
    num_sites: int = Field(4, ge=1, le=10_000)
    partition: PartitionName = "by-chapter"
    alpha: float = Field(1.0, gt=0)
    # Records per site, or "all" of each site's share.
    examples_per_site: Annotated[int, Field(ge=1, le=10_000_000)] | Literal["all"] = 64
    gold_size: int = Field(48, ge=1, le=1_000_000)
    # ICD-10 gold parts besides gold_size's unseen codes (docs/tasks.md): inclusion terms of
    # trained codes, and closed-set ranking among this many same-chapter codes (0: no part).
    gold_phrasings: int = Field(0, ge=0, le=1_000_000)
    gold_ranking_candidates: int = Field(0, ge=0, le=10_000)
    # ICD-10: sites also train on the inclusion terms of their codes (never gold phrasings).
    train_on_inclusion_terms: bool = False
    # Share of each site's records held out as a validation split (never trained on; for
    # choosing hyperparameters without looking at the gold set). 0: none.
    validation_share: float = Field(0.0, ge=0.0, le=0.5)
    chapters: tuple[str, ...] | None = None
    # task name = "files": each site's records and the gold set as files.
    sites: tuple[SiteFilesSection, ...] = ()
    gold_path: Path | None = None
    system_prompt: str | None = None
    # None: the task's own metric (icd10: "code", files: "exact" (the whole normalized answer),
    # drug-review: "sentiment", shakespeare: "next-token"). "label": classification over the
    # gold answers; "similarity": character similarity; "code" only where the gold answers
    # are ICD-10-CM codes (checked when the task is built).
    metric: MetricName | None = None
    # Keep only these sites of the task (a cluster's federation, see [clusters]); with the
    # ICD-10 task the gold set keeps only the chapters these sites hold.
    only_sites: tuple[SafeName, ...] = ()

    @model_validator(mode="after")
    def _files_task_complete(self) -> TaskSection:
        if self.gold_ranking_candidates == 1:
            raise ValueError("gold_ranking_candidates must be 0 (no ranking) or at least 2")
        if self.name == "files":
            if not self.sites:
                raise ValueError('task "files" needs at least one [[task.sites]] entry')
            if self.gold_path is None:
                raise ValueError('task "files" needs gold_path')
            names = [site.name for site in self.sites]
            if len(set(names)) != len(names):
                raise ValueError(f"site names must be unique, got {names}")
        return self


class ClustersSection(Section):
    """Clustered federations: one expert adapter per group of sites (docs/distillation.md).

    ``method`` "groups": ``groups`` maps each cluster name to its sites (every site in exactly
    one); "site": every site is its own cluster; "update-cosine": sites are grouped into
    ``count`` clusters by the cosine similarity of their first-round updates (average-linkage
    agglomeration, deterministic).
    """

    method: ClusterMethod = "none"
    groups: dict[SafeName, tuple[SafeName, ...]] = Field(default_factory=dict)
    count: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _groups_given(self) -> ClustersSection:
        if self.method == "groups" and not self.groups:
            raise ValueError('method "groups" needs [clusters.groups] NAME = ["site", ...]')
        if self.method != "groups" and self.groups:
            raise ValueError(f'groups are only read with method "groups", not {self.method!r}')
        for name, sites in self.groups.items():
            if not sites:
                raise ValueError(f"cluster {name!r} lists no sites")
        listed = [site for sites in self.groups.values() for site in sites]
        repeated = sorted({site for site in listed if listed.count(site) > 1})
        if repeated:
            raise ValueError(f"sites {repeated} are in more than one cluster")
        return self


class TrainSection(Section):
    """Local training at each site, per round.

    Local work is ``local_steps`` batches, or ``local_epochs`` passes over the site's own
    records (each site turns them into steps for its size); give one of them. The learning
    rate of round r follows ``lr_schedule`` over the run's rounds: "constant", or "cosine":
    linear warmup over ``warmup_rounds`` rounds, then cosine decay towards 0.
    """

    local_steps: int | None = Field(None, ge=1, le=1_000_000)
    local_epochs: float | None = Field(None, gt=0, le=1000)
    batch_size: int = Field(4, ge=1, le=65_536)
    learning_rate: float = Field(1e-3, gt=0, le=1)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_rounds: int = Field(0, ge=0, le=1_000_000)
    max_length: int = Field(96, ge=8, le=1 << 20)
    max_grad_norm: float | None = Field(1.0, gt=0)
    # Frozen base weights in bf16 and bf16 compute where that is native; adapters stay fp32.
    precision: PrecisionSetting = "auto"
    # Local training compiled with torch.compile where that works on this machine.
    compile: CompileSetting = "auto"
    # Where training and evaluation run: "cuda" (the first GPU) must exist where the model is
    # loaded (fedsilo.training.device); what sites send and the server aggregates is CPU fp32.
    device: DeviceSetting = "cpu"

    @model_validator(mode="before")
    @classmethod
    def _default_local_steps(cls, data: object) -> object:
        # Neither given: 8 steps, the default from before epochs existed.
        budgets = ("local_steps", "local_epochs")
        if isinstance(data, dict) and all(data.get(name) is None for name in budgets):
            return {**data, "local_steps": 8}
        return data

    @model_validator(mode="after")
    def _one_local_budget(self) -> TrainSection:
        if (self.local_steps is None) == (self.local_epochs is None):
            raise ValueError("give exactly one of local_steps and local_epochs")
        return self


class StrategySection(Section):
    """How the server combines site updates, and when a round counts."""

    name: StrategyName = "fedavg"
    # FedProx: weight of the proximal term (mu / 2) * ||w - w_global||^2 in each site's loss.
    proximal_mu: float = Field(0.01, ge=0)
    # FedAvg and FedProx: Nesterov momentum on the mean delta across rounds (0: none). FedAdam
    # has its own (beta_1).
    server_momentum: float = Field(0.0, ge=0, lt=1)
    # FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization").
    server_learning_rate: float = Field(0.01, gt=0)
    beta_1: float = Field(0.9, ge=0, lt=1)
    beta_2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)
    # A round is aggregated only if at least this many sites returned a valid update.
    min_sites: int = Field(2, ge=1)
    sites_per_round: int | None = Field(None, ge=1)
    round_timeout_s: float = Field(1800.0, gt=0)
    max_round_attempts: int = Field(2, ge=1, le=1000)

    @model_validator(mode="after")
    def _momentum_for_averaging(self) -> StrategySection:
        if self.server_momentum > 0 and self.name not in ("fedavg", "fedprox"):
            raise ValueError(
                f"server_momentum applies to fedavg and fedprox; {self.name} keeps its own "
                "server optimizer state (beta_1)"
            )
        return self


class EvaluationSection(Section):
    """Gold-set evaluation at the server."""

    max_new_tokens: int = Field(10, ge=1)
    batch_size: int = Field(16, ge=1)
    # The gold set is scored before training, after every ``every_rounds``-th round and after
    # the last one. Scoring costs about as much as a short round of training; runs of many
    # short rounds score less often and record no gold figures for the rounds in between.
    every_rounds: int = Field(1, ge=1, le=1_000_000)


class EnrolledSiteSection(Section):
    """A site admitted to the federation, pinned by its public key."""

    name: SafeName
    public_key: str = Field(pattern=r"^ed25519:")  # as written by `fedsilo keys init`
    # Deployment: the site's SuperNode authentication key (NAME.node.pub from
    # `fedsilo certs site`); the coordinator registers it with its SuperLink.
    node_public_key: str | None = Field(None, pattern=r"^ecdsa-sha2-nistp384 ")


class FederationSection(Section):
    """Identity of the federation, bound into every signature, and limits on what sites send."""

    id: str = Field("fedsilo-simulation", min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    # An update larger than this is rejected before it is parsed.
    max_update_bytes: int = Field(256 * 1024 * 1024, ge=1)
    # A plain round weighs each update by the example count its site reports; a site claiming
    # more than this is rejected, so no site can buy more weight than this many examples.
    max_site_examples: int = Field(1_000_000, ge=1, le=2**53)
    # Pinned site keys. Empty in a plain simulation: fedsilo then creates a key pair per site
    # in the run folder. When given, every site of the task must be listed.
    sites: tuple[EnrolledSiteSection, ...] = ()
    # Simulation with pinned keys: the folder holding each site's NAME.key.
    keys_dir: Path | None = None
    # The coordinator's private key (created in the run folder when not given).
    coordinator_key: Path | None = None

    @model_validator(mode="after")
    def _pins_complete(self) -> FederationSection:
        names = [site.name for site in self.sites]
        if len(set(names)) != len(names):
            raise ValueError(f"enrolled site names must be unique, got {names}")
        return self


# The record-level DP-SGD noise multipliers fedsilo runs and a coordinator admits from a site.
# Below 0.3 one round spends an epsilon in the tens to thousands at realistic sampling rates, and
# the accountants grow costly and then fail (the PLD accountant takes 26 s for three rounds at
# 0.3, over a minute at 0.1, and gigabytes near 0.001; RDP divides by zero near 1e-300); above
# 1e4 the noise is ten thousand times the clip norm, no signal survives, and RDP overflows (above
# about 1e154). A ledgered event the accountant cannot compose would stop every later round's
# accounting, so such values are refused where they enter; calibration to a target epsilon
# never goes below the floor (it spends less than the target instead).
MIN_RECORD_NOISE_MULTIPLIER = 0.3
MAX_RECORD_NOISE_MULTIPLIER = 1e4


class PrivacySection(Section):
    """Differential privacy: record-level (DP-SGD at every site) and/or site-level.

    Give either ``noise_multiplier`` or ``target_epsilon``; with a target each site calibrates
    its own noise for its dataset size so that the whole run (``run.rounds`` rounds) spends at
    most ``target_epsilon`` at ``delta``. A site's own policy may refuse a round that would
    exceed its budget.
    """

    record_level: bool = False
    noise_multiplier: float | None = Field(
        None, ge=MIN_RECORD_NOISE_MULTIPLIER, le=MAX_RECORD_NOISE_MULTIPLIER
    )
    # Site-level DP at the coordinator (docs/privacy.md): each site's update clipped to
    # site_clip_norm, Gaussian noise site_noise_multiplier * site_clip_norm on the sum.
    site_level: bool = False
    site_clip_norm: float = Field(1.0, gt=0)
    site_noise_multiplier: float = Field(1.0, gt=0)
    target_epsilon: float | None = Field(None, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: Literal["rdp", "pld"] = "rdp"

    @model_validator(mode="after")
    def _one_noise_setting(self) -> PrivacySection:
        if self.record_level and (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("record_level needs exactly one of noise_multiplier, target_epsilon")
        return self


class SecureAggregationSection(Section):
    """How site updates are combined without the coordinator seeing any one of them.

    "secagg": pairwise-masked fixed-point sums with dropout recovery (docs/secure-aggregation.md);
    "he": CKKS homomorphic encryption under one key the sites create and all hold (the server
    never holds it, but any one site colluding with it can decrypt every update).
    With either, sites send no example counts (updates are equally weighted) and, when
    ``privacy.site_level`` is on, add the DP noise themselves (distributed DP).
    """

    mode: SecureAggregationMode = "none"
    # Fewest sites whose inputs are ever summed (secagg: Shamir threshold); default: a majority
    # of the round's cohort. Below it a round attempt stops cleanly and is retried.
    threshold: int | None = Field(None, ge=2)
    # secagg: each coordinate is clipped to [-clip, clip] before fixed-point quantization.
    # Bounded here so that a setting no quantization can serve (1e-300, 1e300) is refused when
    # the config loads, not when the first round's parameters are built; 1e4 is the largest
    # value any update may hold (protocol.records.MAX_ADAPTER_VALUE).
    clip: float = Field(1.0, ge=1e-6, le=1e4)
    # he: substrings selecting the tensors that are encrypted (empty: all); the others travel
    # in the clear, one per site.
    he_tensors: tuple[str, ...] = ()
    he_poly_modulus_degree: Literal[4096, 8192, 16384] = 8192


class DeploymentSection(Section):
    """How `fedsilo coordinator start` runs the federation on Flower's deployment engine.

    The SuperLink listens on loopback only; sites reach it through nginx on ``listen_host``
    and ``listen_port``, which terminates TLS and forwards the Fleet API paths and nothing
    else. Relative paths are resolved from the config file's folder.
    """

    listen_host: str = "0.0.0.0"
    listen_port: int = Field(9443, ge=1, le=65535)
    # Loopback port of the SuperLink itself (0: a free port chosen at start).
    superlink_port: int = Field(0, ge=0, le=65535)
    certs_dir: Path = Path("certs")  # from `fedsilo certs init`
    state_dir: Path = Path("coordinator-state")  # SuperLink database, nginx config, logs
    run_dir: Path = Path("run")  # the run folder: ledger, checkpoints, metrics
    # Start the run once this many enrolled sites are connected (default: all of them).
    min_sites_connected: int | None = Field(None, ge=1)
    join_timeout_s: float = Field(600.0, gt=0)
    # Before each round's draw, wait up to this long for sites connected at the previous draw
    # that are not connected now (a SuperNode restarting), so that they are not left out of
    # the round; a site that stays away is waited for once. 0: draw at once.
    rejoin_wait_s: float = Field(30.0, ge=0)


class FedsiloConfig(Section):
    """A whole run: the content of one config TOML file."""

    run: RunSection = RunSection()
    federation: FederationSection = FederationSection()
    model: ModelSection = ModelSection()
    lora: LoraSection = LoraSection()
    task: TaskSection = TaskSection()
    train: TrainSection = TrainSection()
    strategy: StrategySection = StrategySection()
    evaluation: EvaluationSection = EvaluationSection()
    privacy: PrivacySection = PrivacySection()
    clusters: ClustersSection = ClustersSection()
    secure_aggregation: SecureAggregationSection = SecureAggregationSection()
    deployment: DeploymentSection | None = None

    @model_validator(mode="after")
    def _keys_located(self) -> FedsiloConfig:
        # A simulation holds every site's private key; a deployment holds none of them.
        federation = self.federation
        if federation.sites and federation.keys_dir is None and self.deployment is None:
            raise ValueError("federation.sites pins keys; keys_dir must name where they are")
        return self

    @model_validator(mode="after")
    def _cohort_fits(self) -> FedsiloConfig:
        if self.clusters.method != "none":
            return self  # each cluster's federation is checked when it is formed
        num_sites = self.num_sites
        per_round = self.strategy.sites_per_round or num_sites
        if per_round > num_sites:
            raise ValueError(
                f"strategy.sites_per_round={per_round} exceeds the {num_sites} sites of the task"
            )
        if self.strategy.min_sites > per_round:
            raise ValueError(
                f"strategy.min_sites={self.strategy.min_sites} can never be met: "
                f"only {per_round} sites take part in a round"
            )
        threshold = self.secure_aggregation.threshold
        if threshold is not None and not per_round < 2 * threshold <= 2 * per_round:
            raise ValueError(
                f"secure_aggregation.threshold={threshold} must be a majority of the "
                f"{per_round} sites of a round and at most {per_round}"
            )
        if self.secure_aggregation.mode != "none" and per_round < 2:
            raise ValueError("secure aggregation needs at least 2 sites per round")
        return self

    @model_validator(mode="after")
    def _no_raw_updates_under_secure_aggregation(self) -> FedsiloConfig:
        if self.secure_aggregation.mode != "none" and self.clusters.method == "update-cosine":
            raise ValueError(
                'clusters.method "update-cosine" shows the coordinator every site\'s raw first '
                "update, which secure aggregation forbids; use groups or site"
            )
        return self

    @property
    def secure_threshold(self) -> int:
        """The fewest sites a secure round sums: the configured threshold (default a majority
        of the cohort), raised to ``strategy.min_sites`` when that is larger."""
        per_round = self.strategy.sites_per_round or self.num_sites
        threshold = self.secure_aggregation.threshold or per_round // 2 + 1
        return max(threshold, self.strategy.min_sites)

    def scores_gold_after(self, round_number: int) -> bool:
        """Whether the gold set is scored after ``round_number``: every
        ``evaluation.every_rounds``-th round and the last one (round 0, the base model, always)."""
        every = self.evaluation.every_rounds
        return round_number % every == 0 or round_number == self.run.rounds

    @property
    def num_sites(self) -> int:
        """Number of sites in the federation."""
        if self.task.only_sites:
            return len(self.task.only_sites)
        return len(self.task.sites) if self.task.name == "files" else self.task.num_sites
