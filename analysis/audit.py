"""Human audit of category leakage in Argilla: ``ethos audit push DIR`` and ``ethos audit pull DIR``.

**push** creates one Argilla dataset per narrow set (``<run>-<constitution>-narrow``; the broad sets too with
``--broad`` or ``audit.include_broad``) in the workspace ``audit.workspace``. Each record is one SFT sample, its id
the sample id (Argilla takes any string as a record's external id, so ids are used verbatim). Fields: the
prompt, the revision, and the critique in a custom field that renders it collapsed (an HTML ``<details>`` block),
so annotators read the revision first and open the critique only when they need it. Metadata: category,
constitution, source, categorisation confidence, the automatic leak scores, and ``audit_pick`` (``top_leak`` or
``random``) with ``audit_rank`` (the order to annotate in). The label question carries a suggestion from the
automatic checks: the nearest held-out category when the checks flag a leak, else ``none``; its score is the
checks' confidence in that answer (``leak_score`` for a leak, ``1 - leak_score`` for ``none``).

Which samples: a seeded random draw of ``audit.random_samples`` from the whole set (the unbiased leak-rate
estimate), plus the ``audit.top_leak_candidates`` other samples with the highest ``leak_score``; the
candidates come first. The population is the set as it was before any audit removal, so pushing after a pull
picks the same records. Pushing is an upsert by record id: pushing twice creates no duplicates and keeps every
response already given.

**pull** reads the submitted responses (drafts and discarded ones are ignored) and writes, to the run's catalog:

- ``audit_responses``: ``dataset, sample_id, annotator, question, value, submitted_at`` (one row per answer).
- ``audit_removed``: ``sample_id, constitution, category, rationale, annotator`` — every narrow-set sample that
  any annotator assigned a held-out category, in its narrow or its broad dataset (it is the same sample).
  ``category`` is the held-out category chosen (the commonest), ``annotator`` who chose it, ``rationale`` their
  words (or the category they chose when they gave none). ``ethos.sets.load_sft_set`` drops these samples from
  the narrow sets. One flag is enough, on purpose: a wrongly dropped sample costs the set little, while a missed
  leak undermines the held-out evaluation — and ``ethos verify`` checks exactly this (every flag resolved).
- ``audit_summary``, one row per audited set: ``population`` (the set's size), ``pushed``, ``audited`` records with
  a submitted response, ``flagged`` records where an annotator chose a held-out category, ``removed`` samples of
  the set in ``audit_removed`` (0 for broad sets), ``agreement`` (Krippendorff's alpha, nominal, on the category
  answer over the ``overlap`` records with two or more annotators; NaN without overlap or when every answer is
  the same, where alpha is undefined), ``percent_agreement`` (the share of annotator pairs on those records who
  agree), and ``leak_rate`` with its 95 % Wilson interval ``leak_rate_lo``/``leak_rate_hi``: the flagged share of
  the audited random draw only (``random_flagged`` of ``random_audited``), an unbiased estimate for the set.

**Category review.** Training prompts that selection kept out of the narrow sets only because their narrow
category is in doubt (``needs_audit``, ``narrow_confidence``, ``heldout_vote``; see ``review_candidates``) go to
one more dataset, ``<run>-category-review``: one record per prompt, the question which category it belongs to.
A prompt that every annotator who answered put in the same narrow category is written to ``audit_confirmed``
(``prompt_id, category, annotators``), and ``load_sft_set`` counts its samples as narrow (``in_narrow`` true,
the confirmed category) in every set. Unanimity, where removal takes one flag: adding to a narrow set needs more
certainty than taking out. Verification accepts confirmed prompts in check 1. Review answers are kept in
``audit_responses`` under the dataset ``category-review``, with the prompt id in ``sample_id``.

The Argilla server is the source of truth: a pull rebuilds the tables from it, so a changed answer changes the
decision, and re-pulling an unchanged server rewrites nothing (tables are only written when their content
changed). Sets whose Argilla dataset is gone keep their earlier rows. Verification reruns after a pull when the
audit tables changed or verification is older than them.

Connection: ``ARGILLA_API_URL`` (default ``http://localhost:6900``) and ``ARGILLA_API_KEY`` (an owner's or
admin's key), the SDK's own variables; a private Hugging Face Space also gets ``HF_TOKEN`` as a bearer token.
The key is never printed or written.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import Counter
from dataclasses import dataclass

import pandas as pd

from ..errors import EthosError
from ..sets import load_sft_set, split_name
from ..store import RunStore

STAGE = "audit"
CATEGORY_QUESTION = "held_out_category"
FAITHFUL_QUESTION = "faithful"
RATIONALE_QUESTION = "rationale"
NONE_LABEL = "none"
SUGGESTION_AGENT = "ethos-verify:leak_score"
DEFAULT_API_URL = "http://localhost:6900"
PICK_TOP, PICK_RANDOM = "top_leak", "random"
RECORDS_PAGE = 500
REVIEW_SET = "category-review"  # the doubtful prompts' review, beside the per-set audits
REVIEW_QUESTION = "reviewed_category"
DOUBTS = ("needs_audit", "narrow_confidence", "heldout_vote")
CONFIRMED_COLUMNS = ["prompt_id", "category", "annotators"]

RESPONSE_COLUMNS = ["dataset", "sample_id", "annotator", "question", "value", "submitted_at"]
REMOVED_COLUMNS = ["sample_id", "constitution", "category", "rationale", "annotator"]
SUMMARY_COLUMNS = ["dataset", "argilla_dataset", "population", "pushed", "audited", "flagged", "removed",
                   "overlap", "agreement", "percent_agreement", "random_audited", "random_flagged",
                   "leak_rate", "leak_rate_lo", "leak_rate_hi"]

_SUMMARY_TYPES = {**{c: "int64" for c in ("population", "pushed", "audited", "flagged", "removed", "overlap",
                                            "random_audited", "random_flagged")},
                  **{c: "float64" for c in ("agreement", "percent_agreement", "leak_rate", "leak_rate_lo",
                                            "leak_rate_hi")}}

_CRITIQUE_TEMPLATE = """
<details style="border:1px solid #ddd;border-radius:6px;padding:6px 10px">
  <summary style="cursor:pointer;font-weight:600">Critique (open when you need it)</summary>
  <div style="white-space:pre-wrap;margin-top:8px">{{record.fields.critique.text}}</div>
</details>
"""


# -- the connection ------------------------------------------------------------------------------------------
def _api_url() -> str:
    return (os.environ.get("ARGILLA_API_URL") or DEFAULT_API_URL).rstrip("/")


@contextlib.contextmanager
def argilla_errors(action: str):
    """Turn the SDK's and httpx's exceptions into one-line EthosErrors that never contain the key."""
    import httpx
    from argilla._exceptions import (ArgillaCredentialsError, ArgillaError, ForbiddenError, NotFoundError,
                                     UnauthorizedError, UnprocessableEntityError)

    url = _api_url()
    try:
        yield
    except EthosError:
        raise
    except (httpx.ConnectError, httpx.TimeoutException, httpx.NetworkError, httpx.UnsupportedProtocol) as exc:
        raise EthosError(f"cannot reach Argilla at {url} ({type(exc).__name__}) while trying to {action}: start the "
                         "server or set ARGILLA_API_URL to its address") from None
    except (ArgillaCredentialsError, UnauthorizedError):
        raise EthosError(f"Argilla at {url} rejected the key in ARGILLA_API_KEY: set it to an owner's or admin's "
                         "API key (Argilla: My settings)") from None
    except ForbiddenError:
        raise EthosError(f"the Argilla user of ARGILLA_API_KEY may not {action} at {url}: use an owner's or "
                         "admin's API key") from None
    except NotFoundError:
        raise EthosError(f"{url} answered 'not found' while trying to {action}: is ARGILLA_API_URL the Argilla "
                         "server's base address (e.g. http://localhost:6900, without /api)?") from None
    except UnprocessableEntityError as exc:
        raise EthosError(f"Argilla at {url} refused to {action}: {_one_line(exc)}") from None
    except (ArgillaError, httpx.HTTPError) as exc:
        raise EthosError(f"Argilla at {url} failed to {action}: {_one_line(exc)}") from None


def _one_line(exc: Exception, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    key = os.environ.get("ARGILLA_API_KEY")
    if key:
        text = text.replace(key, "***")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def connect(timeout: float = 60.0, connect_timeout: float = 5.0):
    """An Argilla client from ARGILLA_API_URL / ARGILLA_API_KEY; fails in seconds when the server is away."""
    import httpx

    key = os.environ.get("ARGILLA_API_KEY")
    if not key:
        raise EthosError("ARGILLA_API_KEY is not set: export an owner's or admin's API key of your Argilla server "
                         "(and ARGILLA_API_URL, default http://localhost:6900)")
    url = _api_url()
    if not url.startswith(("http://", "https://")):
        raise EthosError(f"ARGILLA_API_URL {url!r} is not an http(s) address: set it like http://localhost:6900")
    headers = {}
    hf_token = os.environ.get("HF_TOKEN")
    if hf_token and ".hf.space" in url:  # a private Space sits behind the Hub's authentication
        headers["Authorization"] = f"Bearer {hf_token}"
    import argilla as rg

    with argilla_errors("log in"):
        # The client asks the server who we are as soon as it is built, so a wrong address or key fails here.
        return rg.Argilla(api_url=url, api_key=key, timeout=httpx.Timeout(timeout, connect=connect_timeout),
                          retries=1, headers=headers)


# -- what to audit -------------------------------------------------------------------------------------------
def audit_set_names(recipe, include_broad: bool) -> list[str]:
    names = [f"{c}-narrow" for c in recipe.constitution_names()]
    return names + ([f"{c}-broad" for c in recipe.constitution_names()] if include_broad else [])


def argilla_dataset_name(run_name: str, set_name: str) -> str:
    return f"{run_name}-{set_name}"


def pre_audit_set(store: RunStore, set_name: str) -> pd.DataFrame:
    """The set as it was before audit removals: the population the audit samples from."""
    rows = load_sft_set(store, set_name)
    constitution, scope = split_name(set_name)
    if scope == "narrow" and store.has_table("audit_removed"):
        removed = set(store.read_table("audit_removed")["sample_id"])
        samples = load_sft_set(store, f"{constitution}-broad")  # with the category review's confirmations
        back = samples[samples["in_narrow"] & samples["sample_id"].isin(removed)]
        rows = pd.concat([rows, back], ignore_index=True)
    return rows


def audit_population(store: RunStore, set_name: str) -> pd.DataFrame:
    """The pre-audit set with categorisation confidence and leak scores joined."""
    rows = pre_audit_set(store, set_name)
    scope = split_name(set_name)[1]
    if not store.has_table("leak_scores"):
        raise EthosError(f"table 'leak_scores' missing in {store.root}: run `ethos verify {store.root}` before "
                         "`ethos audit push`")
    confidence = store.read_table("train_prompts")[["prompt_id", "category_confidence"]].drop_duplicates("prompt_id")
    leaks = store.read_table("leak_scores")[["sample_id", "exact_match", "max_ngram_jaccard", "max_cosine",
                                             "nearest_prompt_id", "nearest_category", "leak_score"]]
    rows = rows.merge(confidence, on="prompt_id", how="left").merge(leaks, on="sample_id", how="left")
    if scope == "narrow" and rows["leak_score"].isna().any():
        missing = rows.loc[rows["leak_score"].isna(), "sample_id"].tolist()
        raise EthosError(f"{len(missing)} samples of {set_name} have no leak score (e.g. {missing[0]!r}): the "
                         f"verification is older than the samples; run `ethos verify {store.root}` again")
    return rows.sort_values("sample_id").reset_index(drop=True)


def select_for_audit(population: pd.DataFrame, top_leak_candidates: int, random_samples: int,
                     seed: int) -> pd.DataFrame:
    """The records to push, in annotation order, with ``audit_pick`` and ``audit_rank`` (1 = first).

    The random draw comes from the whole population so that its leak rate estimates the whole set's; the
    leak candidates are the highest ``leak_score`` among the rest (ties broken by sample id)."""
    population = population.sort_values("sample_id").reset_index(drop=True)
    randoms = population.sample(n=min(random_samples, len(population)), random_state=seed)
    rest = population.drop(index=randoms.index)
    top = rest.assign(_score=rest["leak_score"].fillna(-1.0)).sort_values(
        ["_score", "sample_id"], ascending=[False, True]).head(top_leak_candidates).drop(columns="_score")
    picked = pd.concat([top.assign(audit_pick=PICK_TOP), randoms.assign(audit_pick=PICK_RANDOM)],
                       ignore_index=True)
    return picked.assign(audit_rank=range(1, len(picked) + 1))


def suggest_category(row, held_out: list[str], thresholds) -> tuple[str, float] | None:
    """The automatic checks' answer to the category question and their confidence in it."""
    score = row.get("leak_score")
    if score is None or pd.isna(score):
        return None
    leak = bool(row.get("exact_match")) or (row.get("max_ngram_jaccard") or 0) >= thresholds.max_ngram_jaccard \
        or (row.get("max_cosine") or 0) >= thresholds.max_cosine
    nearest = row.get("nearest_category")
    if leak and nearest in held_out:
        return str(nearest), float(score)
    return NONE_LABEL, 1.0 - float(score)


def review_candidates(store: RunStore) -> pd.DataFrame:
    """Training prompts kept out of the narrow sets only because their narrow category is in doubt.

    That is: waiting for audit (``needs_audit``), voted below ``narrow_min_confidence``, or contradicted by other
    sources' labels (``heldout_vote``). Near-duplicates of held-out prompts are no candidates: no answer about
    their category makes them safe. At most ``audit.review_prompts``, highest confidence first. Columns:
    ``prompt_id, prompt, source, category, category_confidence, doubt``.
    """
    recipe = store.recipe()
    train = store.read_table("train_prompts")
    decisions = store.read_table("decontamination") if store.has_table("decontamination") else pd.DataFrame(
        columns=["prompt_id", "reason", "action"])
    reasons = decisions[decisions["action"] == "not_narrow"].groupby("prompt_id")["reason"].agg(set).to_dict()
    needs_audit = train["needs_audit"] if "needs_audit" in train else pd.Series(False, index=train.index)
    doubtful = train[train["category"].isin(recipe.splits.narrow_categories) & ~train["in_narrow"].astype(bool)]
    doubts = []
    for row, audit_flag in zip(doubtful.itertuples(), needs_audit[doubtful.index]):
        why = reasons.get(row.prompt_id, set())
        near_held_out = any(r.startswith("heldout_") and r != "heldout_vote" for r in why)
        doubts.append(None if near_held_out else
                      "needs_audit" if audit_flag else next((d for d in DOUBTS[1:] if d in why), None))
    sampled = set(store.read_table("samples", columns=["prompt_id"])["prompt_id"])
    out = doubtful.assign(doubt=doubts)
    out = out[out["doubt"].notna() & out["prompt_id"].isin(sampled)]
    # The likeliest to be confirmed first (highest confidence), up to audit.review_prompts.
    out = out.sort_values(["category_confidence", "prompt_id"], ascending=[False, True]).head(recipe.audit.review_prompts)
    return out[["prompt_id", "prompt", "source", "category", "category_confidence", "doubt"]].reset_index(drop=True)


def confirm(responses: pd.DataFrame, narrow: list[str]) -> pd.DataFrame:
    """Prompts of the category review that every annotator who answered put in the same narrow category.

    Unanimity, on purpose: bringing a prompt into a narrow set needs more certainty than taking one out (where
    one flag is enough)."""
    answers = responses[(responses["dataset"] == REVIEW_SET) & (responses["question"] == REVIEW_QUESTION)]
    rows = []
    for prompt_id, group in answers.groupby("sample_id", sort=True):
        chosen = set(group["value"])
        if len(chosen) == 1 and (category := chosen.pop()) in narrow:
            rows.append({"prompt_id": prompt_id, "category": category,
                         "annotators": ", ".join(sorted(set(group["annotator"])))})
    return pd.DataFrame(rows, columns=CONFIRMED_COLUMNS)


# -- the Argilla dataset -------------------------------------------------------------------------------------
def guidelines(recipe, set_name: str, held_out: list[str]) -> str:
    from ..constitutions import load_constitution

    constitution_name, scope = split_name(set_name)
    taxonomy = recipe.taxonomy_obj()
    constitution = None
    for ref in recipe.constitutions:
        loaded = load_constitution(str(recipe.resolve_path(ref)) if ref.endswith((".yaml", ".yml")) else ref)
        if loaded.name == constitution_name:
            constitution = loaded
    narrow = ", ".join(f"**{c}**" for c in recipe.splits.narrow_categories)
    categories = "\n".join(f"   - **{c}**: {taxonomy.categories[c]}" for c in held_out)
    purpose = (f"This is the **{scope}** training set of the *{constitution_name}* constitution. "
               + (f"A narrow set must contain only prompts from the narrow categories ({narrow}); every other "
                  "category is held out so that the trained model can later be tested on harms it never saw. "
                  "A sample that belongs to a held-out category is a **leak**: it will be removed from the set."
                  if scope == "narrow" else
                  "A broad set covers every category; here your category answers check the automatic "
                  "categorisation, and nothing is removed."))
    about = (f"\n## The constitution: {constitution.title}\n\n{' '.join(constitution.description.split())}\n"
             if constitution else "")
    text = f"""## What you are checking

{purpose}

Each record is one training sample: a user **prompt**, and the model's **revision** of its first answer after
critiquing it against the constitution. The **critique** is folded away; open it when the revision alone does not
tell you what happened.

## The questions

1. **Which held-out category, if any, does this sample belong to?** Judge the *prompt* (what the user asks for),
   not how the revision handled it. Choose a category when the request is substantially about that harm, even if
   it also touches a narrow category; choose **none** when it is a narrow-category request. The held-out
   categories:
{categories}
2. **Is the revision faithful to the constitution?** 1 = contradicts it, 3 = partly follows it, 5 = a clear,
   faithful application of its principles (summarised below).
3. **Rationale** (optional): a sentence on why, especially when you mark a leak or disagree with the suggestion.
{about}
## The suggestion and the metadata

The pre-selected answer comes from the automatic checks (agent `{SUGGESTION_AGENT}`): the nearest held-out
evaluation prompt's category when the n-gram or embedding similarity crossed its threshold, else *none*. It is a
hint and is often wrong; decide for yourself. Records are ordered by `audit_rank`: first the samples the checks
think most likely to leak, then a random draw (`audit_pick` = random) that estimates how common leaks are, so
please annotate the random ones as carefully as the rest. Submit each record when you are done with it; drafts
are not counted.
"""
    return text[:10000]


def build_settings(recipe, set_name: str, held_out: list[str]):
    import argilla as rg

    taxonomy = recipe.taxonomy_obj()
    return rg.Settings(
        guidelines=guidelines(recipe, set_name, held_out),
        fields=[
            rg.TextField(name="prompt", title="Prompt", use_markdown=False),
            rg.TextField(name="revision", title="Revision (the training target)", use_markdown=True),
            rg.CustomField(name="critique", title="Critique", template=_CRITIQUE_TEMPLATE, required=False),
        ],
        questions=[
            rg.LabelQuestion(name=CATEGORY_QUESTION, title="Which held-out category, if any, does this sample belong to?",
                             labels={c: c for c in [*held_out, NONE_LABEL]}),
            rg.RatingQuestion(name=FAITHFUL_QUESTION, title="Is the revision faithful to the constitution? (1 no - 5 yes)",
                              values=[1, 2, 3, 4, 5]),
            rg.TextQuestion(name=RATIONALE_QUESTION, title="Rationale (optional)", required=False),
        ],
        metadata=[
            rg.TermsMetadataProperty(name="category", title="category", options=list(taxonomy.categories)),
            rg.TermsMetadataProperty(name="constitution", title="constitution", options=recipe.constitution_names()),
            rg.TermsMetadataProperty(name="source", title="source", options=[s.name for s in recipe.sources]),
            rg.FloatMetadataProperty(name="category_confidence", title="categorisation confidence", min=0.0, max=1.0),
            rg.FloatMetadataProperty(name="leak_score", title="leak score", min=0.0, max=1.0),
            rg.FloatMetadataProperty(name="max_ngram_jaccard", title="max n-gram Jaccard", min=0.0, max=1.0),
            rg.FloatMetadataProperty(name="max_cosine", title="max cosine", min=-1.0, max=1.0),
            rg.TermsMetadataProperty(name="nearest_category", title="nearest eval prompt's category",
                                     options=list(taxonomy.categories)),
            rg.TermsMetadataProperty(name="audit_pick", title="why picked", options=[PICK_TOP, PICK_RANDOM]),
            rg.IntegerMetadataProperty(name="audit_rank", title="annotation order", min=1),
        ],
    )


def build_review_settings(recipe):
    import argilla as rg

    taxonomy = recipe.taxonomy_obj()
    narrow = ", ".join(recipe.splits.narrow_categories)
    listing = "\n".join(f"- **{name}**: {text}" for name, text in taxonomy.categories.items())
    return rg.Settings(
        guidelines=(f"These training prompts of run `{recipe.name}` were kept out of the narrow sets ({narrow}) "
                    "because their category is in doubt: the automatic vote was unsure, or other datasets file "
                    "similar prompts under another category. Read the prompt and choose the category it belongs "
                    "to. A prompt joins the narrow sets only when every annotator who answers chooses the same "
                    f"narrow category.\n\nCategories:\n{listing}"),
        fields=[rg.TextField(name="prompt", title="Prompt", use_markdown=False)],
        questions=[
            rg.LabelQuestion(name=REVIEW_QUESTION, title="Which category does this prompt belong to?",
                             labels={c: c for c in taxonomy.categories}),
            rg.TextQuestion(name=RATIONALE_QUESTION, title="Rationale (optional)", required=False),
        ],
        metadata=[
            rg.TermsMetadataProperty(name="category", title="category it was given", options=list(taxonomy.categories)),
            rg.TermsMetadataProperty(name="source", title="source", options=[s.name for s in recipe.sources]),
            rg.FloatMetadataProperty(name="category_confidence", title="categorisation confidence", min=0.0, max=1.0),
            rg.TermsMetadataProperty(name="doubt", title="why it is in doubt", options=list(DOUBTS)),
        ],
    )


def _review_records(candidates: pd.DataFrame) -> list:
    import argilla as rg

    return [rg.Record(id=row["prompt_id"], fields={"prompt": row["prompt"]},
                      metadata={"category": row["category"], "source": row["source"], "doubt": row["doubt"],
                                "category_confidence": float(row["category_confidence"])},
                      suggestions=[rg.Suggestion(REVIEW_QUESTION, row["category"],
                                                 score=round(float(row["category_confidence"]), 6),
                                                 agent="ethos-categorize")])
            for row in candidates.to_dict("records")]


def _check_compatible(dataset, settings, name: str) -> None:
    """A dataset pushed before must ask the same questions, or old and new answers would not mean the same."""
    def shape(s):
        out = {}
        for q in s.questions:
            labels = getattr(q, "labels", None)
            out[q.name] = sorted(labels) if labels is not None else type(q).__name__
        return out

    if shape(dataset.settings) != shape(settings):
        raise EthosError(f"Argilla dataset {name!r} exists with other questions or labels (taxonomy or narrow "
                         "categories changed?): delete it in Argilla or set another audit.workspace")


def _records(picked: pd.DataFrame, held_out: list[str], thresholds) -> list:
    import argilla as rg

    records = []
    for row in picked.to_dict("records"):
        metadata = {"category": row["category"], "constitution": row["constitution"], "source": row["source"],
                    "audit_pick": row["audit_pick"], "audit_rank": int(row["audit_rank"])}
        for name in ("category_confidence", "leak_score", "max_ngram_jaccard", "max_cosine"):
            if row.get(name) is not None and not pd.isna(row[name]):
                metadata[name] = float(row[name])
        if isinstance(row.get("nearest_category"), str):
            metadata["nearest_category"] = row["nearest_category"]
        suggestion = suggest_category(row, held_out, thresholds)
        records.append(rg.Record(
            id=row["sample_id"],
            fields={"prompt": row["prompt"], "revision": row["revision"], "critique": {"text": row["critique"]}},
            metadata=metadata,
            suggestions=[rg.Suggestion(CATEGORY_QUESTION, suggestion[0], score=round(suggestion[1], 6),
                                       agent=SUGGESTION_AGENT)] if suggestion else [],
        ))
    return records


def _dataset(client, workspace, existing: dict, name: str, settings):
    """The Argilla dataset ``name``: created with ``settings``, or the existing one if it asks the same questions."""
    import argilla as rg

    dataset = existing.get(name)
    if dataset is None:
        return rg.Dataset(name=name, workspace=workspace, settings=settings, client=client).create()
    _check_compatible(dataset.get(), settings, name)  # get() loads the settings a listing omits
    return dataset


def _workspace(client, name: str):
    return next((w for w in client.workspaces if w.name == name), None)


@dataclass
class PushedSet:
    set_name: str
    dataset: str
    records: int
    top: int
    random: int
    url: str


def push(store: RunStore, include_broad: bool | None = None, client=None) -> list[PushedSet]:
    """Create or update one Argilla dataset per audited set; returns what was pushed."""
    import argilla as rg

    recipe = store.recipe()
    include_broad = recipe.audit.include_broad if include_broad is None else include_broad
    held_out = recipe.held_out_categories()
    plans = []
    for set_name in audit_set_names(recipe, include_broad):  # read everything before touching the server
        picked = select_for_audit(audit_population(store, set_name), recipe.audit.top_leak_candidates,
                                  recipe.audit.random_samples, recipe.seed)
        plans.append((set_name, picked))
    review = review_candidates(store)
    client = client or connect()
    pushed = []
    with argilla_errors(f"push to workspace {recipe.audit.workspace!r}"):
        workspace = _workspace(client, recipe.audit.workspace)
        if workspace is None:
            workspace = rg.Workspace(name=recipe.audit.workspace, client=client).create()
        existing = {d.name: d for d in workspace.datasets}
        for set_name, picked in plans:
            name = argilla_dataset_name(recipe.name, set_name)
            dataset = _dataset(client, workspace, existing, name, build_settings(recipe, set_name, held_out))
            if len(picked):
                dataset.records.log(_records(picked, held_out, recipe.verification), batch_size=min(200, len(picked)))
            pushed.append(PushedSet(set_name, name, len(picked), int((picked["audit_pick"] == PICK_TOP).sum()),
                                    int((picked["audit_pick"] == PICK_RANDOM).sum()),
                                    f"{client.api_url}/dataset/{dataset.id}/annotation-mode"))
        if len(review):
            name = argilla_dataset_name(recipe.name, REVIEW_SET)
            dataset = _dataset(client, workspace, existing, name, build_review_settings(recipe))
            dataset.records.log(_review_records(review), batch_size=min(200, len(review)))
            pushed.append(PushedSet(REVIEW_SET, name, len(review), 0, 0,
                                    f"{client.api_url}/dataset/{dataset.id}/annotation-mode"))
    return pushed


# -- pulling -------------------------------------------------------------------------------------------------
def _server_records(client, dataset_id) -> list[dict]:
    """Every record with its responses, from the server's REST API (the SDK's record objects drop the
    responses' timestamps)."""
    records, offset = [], 0
    while True:
        response = client.http_client.get(f"/api/v1/datasets/{dataset_id}/records",
                                          params={"include": "responses", "offset": offset, "limit": RECORDS_PAGE})
        response.raise_for_status()
        items = response.json()["items"]
        records += items
        if len(items) < RECORDS_PAGE:
            return records
        offset += len(items)


def _usernames(client) -> dict[str, str]:
    from argilla._exceptions import ForbiddenError

    try:
        return {str(user.id): user.username for user in client.users.list()}
    except ForbiddenError:  # an admin may not list every user; fall back to user ids
        return {}


def responses_frame(set_name: str, records: list[dict], usernames: dict[str, str]) -> pd.DataFrame:
    rows = []
    for record in records:
        for response in record.get("responses") or []:
            if response.get("status") != "submitted":
                continue
            annotator = usernames.get(str(response["user_id"]), str(response["user_id"]))
            submitted_at = pd.Timestamp(response.get("updated_at") or response.get("inserted_at"))
            for question, answer in (response.get("values") or {}).items():
                value = answer.get("value") if isinstance(answer, dict) else answer
                if value is None or value == "":
                    continue
                rows.append([set_name, record["external_id"], annotator, question, str(value), submitted_at])
    frame = pd.DataFrame(rows, columns=RESPONSE_COLUMNS)
    frame["submitted_at"] = pd.to_datetime(frame["submitted_at"]).astype("datetime64[us]")
    return frame


def decide(responses: pd.DataFrame, held_out: list[str]) -> pd.DataFrame:
    """Per sample: each annotator's category answer, who flagged a leak (chose a held-out category), the
    commonest category they chose, and their rationales. One flag is enough to count a sample as flagged."""
    answers = responses[responses["question"] == CATEGORY_QUESTION]
    rationales: dict = {}
    for row in responses[responses["question"] == RATIONALE_QUESTION].itertuples():
        rationales.setdefault((row.sample_id, row.annotator), []).append(row.value)
    rows = []
    for sample_id, group in answers.groupby("sample_id", sort=True):
        labels = dict(zip(group["annotator"], group["value"]))
        chosen = group[group["value"].isin(held_out)]
        flaggers = sorted(set(chosen["annotator"]))
        counts = Counter(chosen["value"]).most_common()
        category = min(c for c, n in counts if n == counts[0][1]) if counts else None
        why = [f"{a}: " + " / ".join(dict.fromkeys(rationales.get((sample_id, a), [])))
               if rationales.get((sample_id, a)) else
               f"{a}: chose " + ", ".join(sorted(set(chosen.loc[chosen["annotator"] == a, "value"])))
               for a in flaggers]
        rows.append({"sample_id": sample_id, "labels": labels, "flagged": bool(flaggers), "category": category,
                     "annotator": ", ".join(flaggers), "rationale": "; ".join(why)})
    frame = pd.DataFrame(rows, columns=["sample_id", "labels", "flagged", "category", "annotator", "rationale"])
    return frame.astype({"flagged": bool})


def krippendorff_alpha_nominal(units: list[list[str]]) -> float:
    """Krippendorff's alpha for nominal labels; units with fewer than two labels do not count. NaN when there is
    nothing to compare or no variation at all (the coefficient is undefined then)."""
    units = [u for u in units if len(u) >= 2]
    if not units:
        return float("nan")
    coincidence: Counter = Counter()
    for labels in units:
        m = len(labels)
        for i, a in enumerate(labels):
            for j, b in enumerate(labels):
                if i != j:
                    coincidence[(a, b)] += 1.0 / (m - 1)
    totals: Counter = Counter()
    for (a, _), count in coincidence.items():
        totals[a] += count
    n = sum(totals.values())
    observed = sum(count for (a, b), count in coincidence.items() if a != b) / n
    expected = sum(totals[a] * totals[b] for a in totals for b in totals if a != b) / (n * (n - 1))
    return float("nan") if expected == 0 else 1.0 - observed / expected


def percent_agreement(units: list[list[str]]) -> float:
    """The share of annotator pairs, over units with two or more labels, who gave the same label."""
    agree = pairs = 0
    for labels in units:
        for i in range(len(labels)):
            for j in range(i + 1, len(labels)):
                pairs += 1
                agree += labels[i] == labels[j]
    return agree / pairs if pairs else float("nan")


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def summarise(set_name: str, argilla_name: str, population: pd.DataFrame, records: list[dict],
              decisions: pd.DataFrame, removed_ids: set[str]) -> dict:
    picks = {r["external_id"]: (r.get("metadata") or {}).get("audit_pick") for r in records}
    overlap = [list(labels.values()) for labels in decisions["labels"] if len(labels) >= 2]
    randoms = decisions[decisions["sample_id"].map(picks) == PICK_RANDOM]
    k, n = int(randoms["flagged"].sum()), len(randoms)
    lo, hi = wilson_interval(k, n)
    narrow = split_name(set_name)[1] == "narrow"
    return {"dataset": set_name, "argilla_dataset": argilla_name, "population": len(population),
            "pushed": len(records), "audited": len(decisions), "flagged": int(decisions["flagged"].sum()),
            "removed": len(set(population["sample_id"]) & removed_ids) if narrow else 0,
            "overlap": len(overlap), "agreement": krippendorff_alpha_nominal(overlap),
            "percent_agreement": percent_agreement(overlap), "random_audited": n, "random_flagged": k,
            "leak_rate": k / n if n else float("nan"), "leak_rate_lo": lo, "leak_rate_hi": hi}


def _same_table(store: RunStore, name: str, frame: pd.DataFrame) -> bool:
    if not store.has_table(name):
        return False
    old = store.read_table(name)
    if list(old.columns) != list(frame.columns) or len(old) != len(frame):
        return False
    return old.reset_index(drop=True).astype(str).equals(frame.reset_index(drop=True).astype(str))


def write_if_changed(store: RunStore, name: str, frame: pd.DataFrame) -> bool:
    """Write a table unless it already holds exactly this content (so its fingerprint stays put)."""
    if _same_table(store, name, frame):
        return False
    store.write_table(name, frame, STAGE)
    return True


def _kept_rows(store: RunStore, name: str, keep) -> pd.DataFrame:
    """Earlier rows of a table for sets whose Argilla dataset is gone (a deleted dataset undoes nothing)."""
    old = store.read_table(name) if store.has_table(name) else pd.DataFrame()
    return old[old.apply(keep, axis=1).astype(bool)] if len(old) else old


def _verification_stale(store: RunStore) -> bool:
    report = store.root / "verification.json"
    if not report.exists():
        return True
    newest = max((store.table_path(t).stat().st_mtime for t in ("audit_responses", "audit_removed", "audit_summary",
                                                                 "audit_confirmed")
                  if store.table_path(t).exists()), default=0.0)
    return report.stat().st_mtime < newest


@dataclass
class PullResult:
    summary: pd.DataFrame
    changed: list[str]
    verification: dict | None
    confirmed: pd.DataFrame  # audit_confirmed: review prompts now in the narrow sets


def pull(store: RunStore, client=None, verify: bool = True) -> PullResult:
    """Read the submitted responses of every audited set on the server into the run's audit tables."""
    recipe = store.recipe()
    held_out = recipe.held_out_categories()
    samples = store.read_table("samples")  # fails clearly, before contacting the server, on a run without samples
    client = client or connect()
    found: dict[str, tuple[str, list[dict]]] = {}
    with argilla_errors(f"read the audit datasets in workspace {recipe.audit.workspace!r}"):
        workspace = _workspace(client, recipe.audit.workspace)
        existing = {d.name: d for d in workspace.datasets} if workspace is not None else {}
        for set_name in [*audit_set_names(recipe, include_broad=True), REVIEW_SET]:
            name = argilla_dataset_name(recipe.name, set_name)
            if name in existing:
                found[set_name] = (name, _server_records(client, existing[name].id))
        usernames = _usernames(client) if found else {}
    if not found:
        raise EthosError(f"no audit datasets of run {recipe.name!r} in Argilla workspace {recipe.audit.workspace!r} "
                         f"at {_api_url()}: push them first with `ethos audit push {store.root}`")

    per_set = {set_name: responses_frame(set_name, records, usernames) for set_name, (_, records) in found.items()}
    responses = _ordered([*per_set.values(), _kept_rows(store, "audit_responses", lambda r: r["dataset"] not in found)],
                         RESPONSE_COLUMNS, ["dataset", "sample_id", "annotator", "question"])
    # The narrow sets' populations include the prompts the review confirms, so that table is written first.
    changed = []
    if REVIEW_SET in found:
        confirmed = _ordered([confirm(responses, list(recipe.splits.narrow_categories))], CONFIRMED_COLUMNS, ["prompt_id"])
        changed += ["audit_confirmed"] if write_if_changed(store, "audit_confirmed", confirmed) else []
    else:  # no review dataset (any more): earlier confirmations stand
        confirmed = _ordered([_kept_rows(store, "audit_confirmed", lambda r: True)], CONFIRMED_COLUMNS, ["prompt_id"])
    # A sample is the same sample in its broad and narrow set: a flag from either takes it out of the narrow set.
    narrow_ids = set(samples.loc[samples["in_narrow"] | samples["prompt_id"].isin(confirmed["prompt_id"]), "sample_id"])
    decisions = decide(responses, held_out)
    flagged = decisions[decisions["flagged"] & decisions["sample_id"].isin(narrow_ids)]
    removed = flagged.assign(constitution=flagged["sample_id"].map(samples.set_index("sample_id")["constitution"]))
    removed = _ordered([removed[REMOVED_COLUMNS]], REMOVED_COLUMNS, ["sample_id"])

    summaries = [pd.DataFrame([summarise(set_name, name, pre_audit_set(store, set_name), records,
                                         decide(per_set[set_name], held_out), set(removed["sample_id"]))
                               for set_name, (name, records) in found.items() if set_name != REVIEW_SET],
                              columns=SUMMARY_COLUMNS),
                 _kept_rows(store, "audit_summary", lambda r: r["dataset"] not in found)]
    tables = {"audit_responses": responses, "audit_removed": removed,
              "audit_summary": _ordered(summaries, SUMMARY_COLUMNS, ["dataset"]).astype(_SUMMARY_TYPES)}
    changed += [name for name, frame in tables.items() if write_if_changed(store, name, frame)]
    verification = None
    if verify and (changed or _verification_stale(store)):
        from .verify import run_verification

        verification = run_verification(store)
    return PullResult(tables["audit_summary"], changed, verification, confirmed)


def _ordered(frames: list[pd.DataFrame], columns: list[str], by: list[str]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype="datetime64[us]" if c == "submitted_at" else "object")
                             for c in columns})
    frame = pd.concat(frames, ignore_index=True)[columns].sort_values(by).reset_index(drop=True)
    return frame.astype({"submitted_at": "datetime64[us]"}) if "submitted_at" in columns else frame


# -- the command line ----------------------------------------------------------------------------------------
def configure_parser(parser) -> None:
    sub = parser.add_subparsers(dest="audit_command", required=True, metavar="{push,pull}")
    push_parser = sub.add_parser("push", help="create or update the Argilla datasets of a run's narrow sets",
                                 description="Create or update one Argilla dataset per narrow set (upsert by sample "
                                             "id). Connection: ARGILLA_API_URL, ARGILLA_API_KEY.")
    push_parser.add_argument("run_dir", help="a run folder with samples and leak_scores")
    push_parser.add_argument("--broad", action="store_true", help="also push the broad sets (audit.include_broad)")
    pull_parser = sub.add_parser("pull", help="read submitted responses into the run, drop leaks, re-verify",
                                 description="Write audit_responses, audit_removed and audit_summary from the "
                                             "submitted responses, then rerun verification.")
    pull_parser.add_argument("run_dir", help="a run folder pushed with `ethos audit push`")


def run_cli(args) -> int:
    import logging

    if not getattr(args, "verbose", False):  # the SDK logs every request at INFO; keep the output to our summary
        for name in ("httpx", "argilla.sdk"):
            logging.getLogger(name).setLevel(logging.WARNING)
    store = RunStore.open(args.run_dir)
    if args.audit_command == "push":
        for item in push(store, include_broad=True if args.broad else None):
            if item.set_name == REVIEW_SET:
                print(f"{item.set_name}: {item.records} prompts whose narrow category is in doubt -> Argilla dataset "
                      f"{item.dataset}: {item.url}")
                continue
            print(f"{item.set_name}: {item.records} records ({item.top} leak candidates first, {item.random} random) "
                  f"-> Argilla dataset {item.dataset}: {item.url}")
        return 0
    result = pull(store)
    for row in result.summary.to_dict("records"):
        rate = ("n/a" if pd.isna(row["leak_rate"]) else
                f"{row['leak_rate']:.1%} [{row['leak_rate_lo']:.1%}, {row['leak_rate_hi']:.1%}] "
                f"from {row['random_audited']} random")
        agreement = "n/a" if pd.isna(row["agreement"]) else f"{row['agreement']:.2f}"
        print(f"{row['dataset']}: audited {row['audited']}, flagged {row['flagged']}, removed {row['removed']}, "
              f"agreement (alpha) {agreement} on {row['overlap']} shared, leak rate {rate}")
    if len(result.confirmed):
        print(f"category review: {len(result.confirmed)} prompts confirmed in a narrow category join the narrow sets")
    print("tables updated: " + (", ".join(result.changed) if result.changed else "none (nothing new)"))
    if result.verification is not None:
        print(f"verification rerun: {'passed' if result.verification.get('passed') else 'FAILED'}")
    return 0
