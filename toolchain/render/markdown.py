"""The Markdown people read of eval, export and bench (eval.md, export.md, bench.md), also used by the report and
the model card: one place, so a stage's numbers read the same wherever they are shown."""

from __future__ import annotations

from toolchain.backends.speculative import best
from toolchain.quality import scores as em
from toolchain.quality.cost import local_per_call
from toolchain.quality.heldout import ROLES

SAMPLES_IN_REPORT = 5


def _fmt(x, pct: bool = True) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}" if pct else f"{x:.2f}"


def _ci(lo_hi, pct: bool = True) -> str:
    if not lo_hi:
        return ""
    lo, hi = lo_hi
    return f"[{100 * lo:.0f}-{100 * hi:.0f}]" if pct else f"[{lo:.2f}-{hi:.2f}]"


def gate_word(v: dict) -> str:
    """A task's gate decision in one word: pass, FAIL, UNDECIDED (or undecided, allowed)."""
    decision = v.get("decision", "pass" if v["passed"] else "fail")
    if decision == "undecided":
        return "undecided (allowed)" if v["passed"] else "UNDECIDED"
    return "pass" if decision == "pass" else "FAIL"


def gate_head(verdict: dict) -> str:
    """passed / FAILED, naming the failed and undecided tasks."""
    if verdict["passed"]:
        return "passed"
    parts = [", ".join(verdict["failed"]) + " failed"] if verdict["failed"] else []
    parts += [", ".join(verdict["undecided"]) + " undecided"] if verdict.get("undecided") else []
    return "FAILED: " + "; ".join(parts)


def _quality_rows(report: dict, verdict: dict | None):
    """(task, n, teacher, student, retention, McNemar p, gate) cells per gold task and the pool, as strings."""
    ret, iv = report["retention"], report.get("intervals", {}).get("tasks", {})
    judged = (verdict or {}).get("tasks", {})
    names = [t for t, r in ret["tasks"].items() if r["teacher"] is not None] + ["overall"]
    for name in names:
        row = ret["overall"] if name == "overall" else ret["tasks"][name]
        if row["teacher"] is None:
            continue
        i = iv.get(name, {})
        p = i.get("p_student_below")
        g = judged.get(name)
        gate = "" if g is None else "reported (no floor)" if g["floor"] <= 0 else \
            f"{gate_word(g)} ({g['why']}, floor {g['floor']:g})"
        n = row["gold_docs"] if name != "overall" else ret["overall"]["gold_docs"]
        yield (name, str(n), f"{_fmt(row['teacher'])} {_ci(i.get('teacher'))}".strip(),
               f"{_fmt(row['student'])} {_ci(i.get('student'))}".strip(),
               f"{_fmt(row['retention'], False)} {_ci(i.get('retention'), False)}".strip(),
               "-" if p is None else f"{p:.3f}", gate)


def eval_table(report: dict, verdict: dict | None = None) -> str:
    """The console table: gold accuracy of teacher and student with 95% intervals, retention, McNemar's p of
    "student below teacher" and the gate's decision per task; then agreement with the teacher and perplexity."""
    verdict = verdict if verdict is not None else report.get("gate")
    lines = [
        f"{'task':12s} {'n':>4s}  {'teacher gold':17s} {'student gold':17s} {'retention':17s} {'p(s<t)':>7s}  gate"
    ]
    for name, n, t, s, r, p, g in _quality_rows(report, verdict):
        lines.append(f"{name:12s} {n:>4s}  {t:17s} {s:17s} {r:17s} {p:>7s}  {g}")
    scores = report["scores"]
    lines += ["", f"{'task':12s} {'n':>4s} {'agree':>6s} {'chrF':>6s} {'ppl s/t':>13s}"
              + (f" {'before':>7s}" if "base" in scores else "")]
    for task in report["retention"]["tasks"]:
        s = scores["student"][task]
        ppl = f"{_fmt(s['perplexity'], False)}/{_fmt(scores['teacher'][task]['perplexity'], False)}"
        before = f" {_fmt(scores['base'][task].get('gold')):>7s}" if "base" in scores else ""
        lines.append(f"{task:12s} {report['docs'][task]:4d} {_fmt(s['exact']):>6s} {s['chrf']:6.1f} {ppl:>13s}{before}")
    lines += [""] + interval_notes(report) + gate_notes(report, verdict) + ceiling_notes(report)
    return "\n".join(lines).rstrip()


def interval_notes(report: dict) -> list[str]:
    iv = report.get("intervals")
    if not iv:
        return []
    out = [f"[..]: 95% intervals, {iv['method']}, {iv['iters']} resamples, seed {iv['seed']}; "
           f"p(s<t): McNemar's exact one-sided test of \"student below teacher\""]
    source = str(report.get("teacher_answers", ""))
    if source.startswith("generate"):
        out.append("teacher gold: its greedy held-out answers from the generate stage (eval.teacher_answers)")
    elif source.startswith("the data's reference answers"):
        out.append(f"teacher column: {source} (generate.answers), what the student learned from")
    if report.get("teacher_likelihood") == "generate":
        out.append("teacher perplexity: of its held-out answers under the logits llama.cpp chose them from in generate")
    if report.get("base", {}).get("note"):
        out.append(report["base"]["note"])
    metrics = report.get("metrics", {})
    if metrics:
        out.append("gold checked by: " + ", ".join(
            f"{t} {m['metric']}" + (f" (at most {m['max_words']} words)" if m.get("max_words") else "")
            for t, m in sorted(metrics.items()) if report.get("gold_docs", {}).get(t) or m["metric"] == "judge"))
    return out + list(report.get("notes", []))


def gate_notes(report: dict, verdict: dict | None) -> list[str]:
    if not verdict:
        return []
    head = f"gate ({verdict['rule']}, level {verdict['level']:g}): {gate_head(verdict)}"
    notes = [f"  {name}: {v['note']}" for name, v in verdict["tasks"].items() if v.get("note")]
    return [head, *notes]


def ceiling_notes(report: dict) -> list[str]:
    ret = report["retention"]
    out = []
    for task, row in ret["tasks"].items():
        if row["ceiling"]:
            out.append(f"quality ceiling: the teacher itself gets {_fmt(row['teacher'])}% of '{task}' right "
                       f"(below {100 * em.QUALITY_CEILING:.0f}%); a better teacher, not more distillation, moves it")
    for task, lab in (report.get("labels") or {}).items():
        teacher, base = ret["tasks"].get(task, {}).get("teacher"), lab["baselines"]
        if teacher is not None and base["majority"] is not None and teacher <= base["majority"]:
            out.append(f"'{task}': the teacher ({_fmt(teacher)}%) is no better than always answering "
                       f"'{base['majority_label']}' ({_fmt(base['majority'])}%): distil from reference answers or a "
                       "stronger teacher; distilling this one teaches the student nothing")
        v = (lab.get("classical") or {}).get("vs_student")
        if v and v["classical"] >= v["student"]:
            out.append(f"'{task}': a classical classifier on the training rows' labels gets {_fmt(v['classical'])}% "
                       f"where the student gets {_fmt(v['student'])}% (McNemar p = {v['p_student_below']:.2g} that "
                       "the student is below it): a language model may not be the cheapest way to do this task "
                       "(labels section)")
    return out


def classical_line(c: dict | None, student_usd_per_1k: float | None = None) -> str:
    """The classical baseline of a label task in one sentence: accuracy with its interval, against the student
    (McNemar both ways), and what a call costs; with ``student_usd_per_1k`` (bench's, measured) the two costs side
    by side."""
    if not c:
        return ""
    if c.get("skipped"):
        return f"Classical baseline: not trained ({c['skipped']})."
    iv = c.get("interval")
    ci = f" [{_fmt(iv[0])}-{_fmt(iv[1])}]" if iv else ""
    chosen = f"C = {c['C']:g} by {c['folds']}-fold cross-validation on the training rows" if c["folds"] else \
        "C = 1 (too few rows of a label to cross-validate)"
    text = (f"Classical baseline ({c['method']}, trained on the {c['train_rows']} training rows' gold labels, "
            f"{chosen}): {_fmt(c['accuracy'])}%{ci} of {c['n']}")
    v = c.get("vs_student")
    if v:
        text += (f"; the student {_fmt(v['student'])}% on the same prompts ({v['classical_only']} right only by "
                 f"the classifier, {v['student_only']} only by the student; McNemar p = "
                 f"{v['p_student_below']:.2g} that the student is below it, {v['p_classical_below']:.2g} the other "
                 "way)")
    if c.get("usd_per_1k") is not None:
        text += (f". It answers in {1000 * c['seconds_per_call']:.2f} ms a call on this machine "
                 f"(${c['usd_per_1k']:.6f} per 1,000 calls; {c['model_bytes'] / 1e6:.2f} MB)")
        if student_usd_per_1k:
            text += f" against the student's ${student_usd_per_1k:.5f}"
    return text + "."


def label_markdown(report: dict, per_call: dict | None = None) -> list[str]:
    """Per label task: precision and recall per label for each model and the classical baseline, the baselines,
    and the confusion matrices. ``per_call``: bench's cost per call by task, for the classical comparison."""
    out = []
    for task, lab in (report.get("labels") or {}).items():
        roles = [r for r in ROLES if r in lab] + (["classical"] if "confusion" in lab.get("classical", {}) else [])
        base = lab["baselines"]
        student_usd = (per_call or {}).get(task, {}).get("student_usd_per_1k")
        out += [
            "",
            f"## {task}: labels",
            "",
            f"Baselines: always '{base['majority_label']}' {_fmt(base['majority'])}%, a uniform guess "
            f"{_fmt(base['uniform'])}%. Precision / recall (%) per label; the label an answer names first "
            'counts, "(none)" when it names none.',
            "",
            *([classical_line(lab["classical"], student_usd), ""] if lab.get("classical") else []),
            "| label | support | " + " | ".join(f"{r} P / R" for r in roles) + " |",
            "|---|---:|" + "---:|" * len(roles),
        ]
        for x in lab["labels"]:
            cells = [
                f"{_fmt(lab[r]['per_label'][x]['precision'])} / {_fmt(lab[r]['per_label'][x]['recall'])}" for r in roles
            ]
            out.append(f"| {x} | {lab[roles[0]]['per_label'][x]['support']} | " + " | ".join(cells) + " |")
        for r in roles:
            cols = list(lab["labels"]) + [em.NO_LABEL]
            out += ["", f"{r}: gold (rows) against the label answered (columns)", "",
                    "| gold | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
            for gold, row in lab[r]["confusion"].items():
                out.append(f"| {gold} | " + " | ".join(str(row.get(c, 0)) for c in cols) + " |")
    return out


def eval_markdown(report: dict, rows: list[dict], results: dict[str, dict]) -> str:
    ret, scores = report["retention"], report["scores"]
    verdict = report.get("gate")
    out = [f"# Evaluation: {report['recipe']}", ""]
    if verdict:
        out += [f"**Quality gate: {gate_head(verdict)}** ({verdict['rule']} rule, "
                f"level {verdict['level']:g}; docs/evaluation.md explains it).", ""]
    out += ["Gold accuracy (%) per task with 95% intervals; retention = student / teacher; p(s<t): McNemar's exact "
            "test of \"student below teacher\".", "",
            "| task | n | teacher | student | retention | p(s<t) | gate |", "|---|---:|---:|---:|---:|---:|---|"]
    for name, n, t, s_, r, p, g in _quality_rows(report, verdict):
        bold = "**" if name == "overall" else ""
        out.append(f"| {bold}{name}{bold}{' (ceiling)' if name != 'overall' and ret['tasks'][name]['ceiling'] else ''} "
                   f"| {n} | {t} | {s_} | {bold}{r}{bold} | {p} | {g} |")
    roles = [r for r in ROLES if r in scores]
    names = {"teacher": "teacher", "student": "student", "base": "student before distillation"}
    out += [
        "",
        "Agreement and chrF against the teacher's own held-out answers; perplexity of the teacher's answers "
        "per student token.",
        "",
        "| task | docs | "
        + " | ".join(f"{names[r]} gold" for r in roles)
        + " | exact agree | chrF | ppl (student / teacher) |",
        "|---|---:|" + "---:|" * len(roles) + "---:|---:|---:|",
    ]
    for task in ret["tasks"]:
        s_, t = scores["student"][task], scores["teacher"][task]
        out.append(
            f"| {task} | {report['docs'][task]} | "
            + " | ".join(_fmt(scores[r][task].get("gold")) for r in roles)
            + f" | {_fmt(s_['exact'])} | {s_['chrf']:.1f} | {_fmt(s_['perplexity'], False)} / "
              f"{_fmt(t['perplexity'], False)} |"
        )
    out += [""] + [f"> {n}" for n in interval_notes(report) + gate_notes(report, verdict) + ceiling_notes(report)
                   + synthetic_notes(report)]
    out += label_markdown(report) + judge_markdown(report) + cascade_markdown(report.get("cascade"))
    by_id = {r["id"]: r for r in rows}
    for task in ret["tasks"]:
        out += ["", f"## {task}: samples", ""]
        student = results["student"]["samples"][task][:SAMPLES_IN_REPORT]
        teacher = {s["id"]: s for s in results["teacher"]["samples"][task]}
        for s in student:
            r = by_id[s["id"]]
            out += [
                f"**{r['id']}** — {_one_line(r['prompt'])}"
                + (f" (gold: {r['gold']})" if r["gold"] is not None else ""),
                f"- teacher: {_one_line(teacher[s['id']]['response'])}",
                f"- student: {_one_line(s['response'])}",
                "",
            ]
    return "\n".join(out) + "\n"


def cascade_markdown(c: dict | None) -> list[str]:
    """The cascade table (toolchain.quality.cascade.from_eval): per target, the calls the student keeps and what
    the combined answers keep of the teacher's gold on prompts the thresholds were not chosen on; then how well
    each confidence score separates the student's right answers from its wrong ones."""
    if not c:
        return []
    how = f"one-sided lower bound at level {c['level']:g}" if c["rule"] == "lower" else "point estimate"
    priced = all("usd_per_1k" in row for row in c["targets"])  # with bench's per-call prices (the report)
    out = ["", "## Cascade: the student answers when it is sure, the teacher the rest", "",
           f"Thresholds per task chosen on {c['calibration']:.0%} of its held-out prompts (seed {c['seed']}; a target "
           f"is reached when the {how} of the combined retention is), reported on the rest:", "",
           "| target | n | kept locally | combined gold | teacher gold | retention [one-sided bounds] | "
           "student errors kept |" + (" $ per 1,000 calls (API alone) |" if priced else ""),
           "|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if priced else "")]
    for row in c["targets"]:
        bounds = (f" [{row['lower']:.2f}, {row['upper']:.2f}]" if row["lower"] is not None else "")
        cost = f" ${row['usd_per_1k']:.4f} (${row['api_usd_per_1k']:.4f}) |" if priced else ""
        out.append(f"| {row['target']:.2f} | {row['n']} | {100 * row['kept']:.0f}% | {100 * row['combined']:.1f} | "
                   f"{100 * row['teacher']:.1f} | {num(row['retention'])}{bounds} | {row['kept_wrong']} |" + cost)
    scores = sorted({name for t in c["tasks"].values() for name in t["auroc"]})
    out += ["", "AUROC of each confidence score (right vs wrong student answers, all of a task's prompts); the "
            "task routes on the one marked, chosen on its calibration part:", "",
            "| task | n | " + " | ".join(scores) + " |", "|---|---:|" + "---:|" * len(scores)]
    for task, t in c["tasks"].items():
        cells = [("-" if t["auroc"].get(s) is None else f"{t['auroc'][s]:.2f}") + (" ←" if s == t["score"] else "")
                 for s in scores]  # "-": no right-vs-wrong split, or a score the task has not (label)
        out.append(f"| {task} | {t['n']} | " + " | ".join(cells) + " |")
    return out


def synthetic_notes(report: dict) -> list[str]:
    """Where the training prompts came from when the teacher wrote some (synthesize), and how many of those were
    dropped for resembling a held-out prompt: the user sees that the scores above are not inflated by them."""
    s = report.get("synthetic")
    if not s:
        return []
    return [f"training prompts: {s['seeds']} from the data and {s['kept']} written by the teacher ({s['method']}; "
            f"{s['written']} written); {s.get('dropped_contaminated', 0)} dropped as contaminated (sharing at least "
            f"{s['decontaminate_threshold']:.0%} of their word {s['decontaminate_ngram']}-grams with a held-out "
            f"prompt), {s.get('dropped_exact_duplicate', 0) + s.get('dropped_near_duplicate', 0)} as duplicates"]


def judge_markdown(report: dict) -> list[str]:
    """The judge tasks: the student's answer against the teacher's, as the judge model saw them."""
    judged = report.get("judge") or {}
    if not judged:
        return []
    out = ["", "## Judged tasks", "",
           "A judge model compared the student's answer with the teacher's for each held-out prompt, asked twice with "
           "the answers swapped. Score: 1 = student better in both orders, 0.5 = tie (or the orders disagree), "
           "0 = teacher better; 0.5 overall is as good as the teacher.", "",
           "| task | judge | n | student wins | ties | teacher wins | score [95%] | orders agree | parse failures |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for task, j in judged.items():
        iv = f" [{j['interval'][0]:.2f}-{j['interval'][1]:.2f}]" if j["interval"] else ""
        agree = "-" if j["order_agreement"] is None else f"{100 * j['order_agreement']:.0f}%"
        score = "-" if j["score"] is None else f"{j['score']:.2f}{iv}"
        out.append(f"| {task} | {j['judge']} | {j['n']} | {j['wins']} | {j['ties']} | {j['losses']} | {score} | "
                   f"{agree} "
                   f"| {j['parse_failures']} of {j['asked']} |")
    weak = [t for t, j in judged.items() if j["order_agreement"] is not None and j["order_agreement"] < 0.5]
    if weak:
        out += ["", f"> {', '.join(weak)}: the judge changed its verdict with the answers' order for most prompts; "
                    "it is too weak for this task: name a stronger judge in tasks.<task>.judge (an openai: endpoint)."]
    return out


def _one_line(text: str | None, width: int = 200) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


# --- export ---

def _greedy(r: dict) -> str:
    ties = r.get("greedy_near_ties", 0)
    return f"{r['greedy_same']}/{r['greedy_prompts']}" + (f" (+{ties} near tie)" if ties else "")


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def num(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def export_markdown(report: dict) -> str:
    head = ("| file | size (MB) | bits/weight | held-out gold % | retention | ppl | greedy = PyTorch | top-1 agree % "
            "| mean KL | tokenizer |")
    lines = [f"# Export: {report['recipe']}", "",
             head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    p = report["pytorch"]
    lines.append(f"| PyTorch (merged) | {p['bytes'] / 1e6:.1f} | {p['bits_per_weight']:.2f} | {pct(p['gold'])} | "
                 f"{num(p['retention'])} | {num(p['perplexity'])} | reference | reference | 0 | HF |")
    for r in report["files"]:
        tok = f"{r['tokenizer_same_as_hf']}/{r['tokenizer_strings']}"
        if r.get("tokenizer_same_as_source") is not None:
            tok += f" (source GGUF {r['tokenizer_same_as_source']}/{r['tokenizer_strings']})"
        name = f"{r['file']} (imatrix)" if r.get("imatrix") else r["file"]
        lines.append(
            f"| {name} | {r['bytes'] / 1e6:.1f} | {r['bits_per_weight']:.2f} | {pct(r.get('gold'))} | "
            f"{num(r.get('retention'))} | {num(r.get('perplexity'))} | {_greedy(r)} | {pct(r['top1_agreement'])} | "
            f"{r['mean_kl']:.2g} | {tok} |"
        )
    lines += ["", f"Teacher held-out gold: {pct(report['teacher_gold'])}%. Retention = file's gold / teacher's gold. "
              "bits/weight = bytes of tensor data (GGUF) or of the whole file (ONNX, PyTorch) × 8 / parameters; "
              "k-quants fall back to other types on rows not divisible by 256, so the preset name is not the size.",
              f"Greedy parity: {len(report['check_prompts'])} fixed prompts, up to {report['check_tokens']} tokens; "
              "top-1 agreement and KL(PyTorch ‖ file) over the same sequences; tokenizer: identical ids on "
              "evals/tokenizer_strings.json. A near tie: the outputs part where PyTorch's own margin between the two "
              "tokens is under twice the largest logit difference between PyTorch and the file (float rounding).", ""]
    weighted = next((r["imatrix"] for r in report["files"] if r.get("imatrix")), None)
    if weighted:
        lines += [f"(imatrix): quantized with llama.cpp's importance matrix, measured by llama-imatrix on "
                  f"{weighted['chunks']} windows of {weighted['chunk_tokens']} tokens of the training conversations "
                  "(never the held-out prompts).", ""]
    made = [r for r in report["files"] if r.get("modelfile")]
    if made:
        lines += ["Laptop runtimes: every GGUF carries the chat template the student was trained with (the recipe's "
                  "system prompt as its default), its end-of-turn token and its provenance, so llama-server and LM "
                  "Studio run it as it is; for Ollama, from this folder:", ""]
        lines += [f"    ollama create {report['recipe']}-{r['variant'].replace('_', '-')} -f {r['modelfile']}"
                  for r in made] + [""]
    f = report.get("foreign_server")
    if f:
        lines += [f"Checked in a server that is not ours: {f['server']} on {f['file']}, its chat format read from the "
                  f"file, asked the {f['prompts']} check prompts without a system message, gave distillery serve's "
                  f"greedy answers for {f['same']} of {f['prompts']}.", ""]
    lines += _constrained_lines(report)
    notes = quality_notes(report)
    return "\n".join(lines + (notes + [""] if notes else []))


def _constrained_lines(report: dict) -> list[str]:
    """serve.constrain: task: each GGUF's held-out accuracy and decode speed free and under the task's constraint."""
    rows = [(r, task, c) for r in report["files"] for task, c in sorted((r.get("constrained") or {}).items())]
    if not rows:
        return []
    out = ["Task-constrained decoding (`serve.constrain: task`): the held-out prompts of every task with a constraint, "
           "answered greedily through `distillery serve`'s engine free and under the task's grammar; p: McNemar's "
           "exact test of \"constrained below free\"; decode tokens/s leave prompt time out.", "",
           "| file | task | n | free % | constrained % | p | decode tok/s free | constrained | ratio |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r, task, c in rows:
        f, k = c["free"], c["constrained"]
        out.append(f"| {r['file']} | {task} | {c['n']} | {pct(f['accuracy'])} | {pct(k['accuracy'])} | "
                   f"{_p(c['mcnemar']['p_student_below'])} | {num(f['decode_tokens_per_s'])} | "
                   f"{num(k['decode_tokens_per_s'])} | {num(c['speed_ratio'])} |")
    return out + [""]


def _p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def quality_notes(report: dict) -> list[str]:
    """Files whose held-out answers are significantly worse than the PyTorch student's (McNemar, paired by
    prompt, at eval.gate_level): what quantization cost, said where a user picks a file."""
    flagged = em.flagged_files(report)
    out = []
    for r in report["files"]:
        v = r.get("vs_pytorch")
        if r["file"] in flagged:
            out.append(f"**{r['file']} is below the PyTorch student**: {pct(r.get('gold'))}% vs "
                       f"{pct(report['pytorch']['gold'])}% gold ({v['pytorch_only']} prompts right only in PyTorch, "
                       f"{v['file_only']} only in the file, of {v['n']}; {_p(v['p_below_pytorch'])}): quantization "
                       "cost quality; publish leaves it out and serve refuses it unless --include-flagged.")
    return out


# --- bench ---

def _cell(stat: dict | None, fmt: str = "{:.1f}", scale: float = 1.0) -> str:
    if not stat:
        return "-"
    return f"{fmt.format(stat['median'] * scale)} ({fmt.format(stat['min'] * scale)}–{fmt.format(stat['max'] * scale)})"


def bench_markdown(report: dict) -> str:
    s, r, q = report["summary"], report["ratios"], report["quality"]
    usd = report["usd_per_1m_output_tokens"]

    def num(x, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x)

    lines = [
        f"# Bench: {report['recipe']} ({report['backend']}, {report['quant']}, {report['threads']} threads)",
        "",
        "| | teacher | student | student / teacher |",
        "|---|---:|---:|---:|",
        f"| decode tokens/s | {_cell(s['teacher'].get('decode_tps'))} | {_cell(s['student'].get('decode_tps'))} | "
        f"**{num(r['decode_tps'])}×** |",
        f"| prompt tokens/s | {_cell(s['teacher'].get('prompt_tps'))} | {_cell(s['student'].get('prompt_tps'))} | "
        f"{num(r['prompt_tps'])}× |",
        f"| time to first token (ms) | {_cell(s['teacher'].get('ttft_ms'))} | {_cell(s['student'].get('ttft_ms'))} | "
        f"{num(r['ttft'])}× |",
        f"| peak RSS (MB) | {_cell(s['teacher'].get('peak_rss_bytes'), '{:.0f}', 1e-6)} | "
        f"{_cell(s['student'].get('peak_rss_bytes'), '{:.0f}', 1e-6)} | {num(r['peak_rss'])}× |",
        f"| size on disk (MB) | {report['bytes']['teacher'] / 1e6:.1f} | {report['bytes']['student'] / 1e6:.1f} | "
        f"{num(r['size'])}× |",
        f"| $ per 1M output tokens | {usd['teacher']:.4f} | {usd['student']:.4f} | {num(r['usd_per_1m'])}× |",
        f"| held-out gold % | {num(q['teacher_gold'] and 100 * q['teacher_gold'], '{:.1f}')} | "
        f"{num(q['student_gold'] and 100 * q['student_gold'], '{:.1f}')} | {num(q['retention'])} (retention) |",
        "",
        f"Median (min–max) over {report['repeats']} runs of {report['prompts']} held-out prompts, up to "
        f"{report['max_new_tokens']} new tokens, greedy, teacher and student alternating, each in its own process.",
        f"$ per 1M output tokens at ${report['settings']['usd_per_hour']}/hour, one request at a time, prompt "
        f"processing included. Reference API: ${report['reference_api_usd_per_1m_output']}/1M output tokens → the "
        f"student costs **1/{1 / r['student_cost_vs_api']:.0f}** of it."
        if r["student_cost_vs_api"]
        else "",
        "",
    ]
    per_call = report.get("per_call")
    if per_call:  # the student's prompt is shorter where data.strip_instructions left the instructions out
        lines += ["What a call costs, per task, at its median prompt and answer lengths (the teacher's token counts "
                  f"for the API: ${report.get('reference_api_usd_per_1m_input', '-')} input / "
                  f"${report['reference_api_usd_per_1m_output']} output per 1M, no cached input; the student's "
                  f"measured wall time per call at ${report['settings']['usd_per_hour']}/hour):", "",
                  "| task | prompts | prompt tokens (API / student) | answer tokens | API $ per 1,000 calls | "
                  "student $ per 1,000 calls (one at a time) | API / student | student at load | API / student at "
                  "load |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for task, t in per_call.items():
            own = t.get("student_prompt_tokens")
            lines.append(f"| {'**all**' if task == 'all' else task} | {t['calls']} | {t['prompt_tokens']:.0f} / "
                         f"{num(own, '{:.0f}')} | "
                         f"{t['answer_tokens']:.0f} | {t['api_usd_per_1k']:.4f} | {t['student_usd_per_1k']:.5f} | "
                         f"**{num(t['ratio'], '{:.0f}×')}** | {num(t['student_usd_per_1k_loaded'], '{:.5f}')} | "
                         f"{num(t['ratio_loaded'], '{:.0f}×')} |")
        mix = per_call.get("all", {})
        if report.get("strip_instructions") and mix.get("student_prompt_tokens") is not None:
            left = mix["prompt_tokens"] - mix["student_prompt_tokens"]
            usd = left * report["reference_api_usd_per_1m_input"] / 1000
            lines += ["", f"data.strip_instructions: the student reads {mix['student_prompt_tokens']:.0f} prompt "
                      f"tokens a call where the teacher read {mix['prompt_tokens']:.0f}; the {left:.0f} tokens of "
                      f"instructions cost ${usd:.4f} per 1,000 calls at the API's input price, and no student call "
                      "carries them."]
        lines.append("")
    be = report["break_even"]
    if be["output_tokens"]:
        lines.append(f"Break-even: distillation took {be['one_time_seconds'] / 60:.1f} machine-minutes "
                     f"(${be['one_time_usd']:.4f} at ${report['settings']['distill_hardware_usd_per_hour']}/hour); "
                     "each 1M "
                     f"output tokens saves ${be['saving_usd_per_1m_output']:.2f}, so it pays back after "
                     f"{be['output_tokens']:,.0f} output tokens. A dedicated machine "
                     f"(${be['hardware_usd_per_month']:.0f}/month) "
                     f"serves up to {be['capacity_tokens_per_month'] / 1e6:,.0f}M output tokens a month at this speed.")
    ld = report.get("loaded")
    if ld:
        lines += [
            "",
            f"A busy server ({ld['concurrency']} requests decoding together, `serve.batch: "
            f"{ld['concurrency']}`): {_cell(s['teacher'].get('loaded_tps'))} tokens/s teacher, "
            f"{_cell(s['student'].get('loaded_tps'))} student (**{num(ld['tps_ratio'])}×**); $ per 1M output "
            f"tokens at full load {ld['usd_per_1m_output_tokens']['teacher']:.4f} vs "
            f"{ld['usd_per_1m_output_tokens']['student']:.4f}"
            + (
                f" → **1/{1 / ld['student_cost_vs_api']:.0f}** of the reference API."
                if ld["student_cost_vs_api"]
                else "."
            ),
        ]
    if "served" in report:
        sv = report["served"]
        pairs = sv.get("decode_ratio_runs") or []
        lines += ["", f"Served through `distillery serve` (HTTP, streamed): decode "
                      f"{_cell(sv['summary'].get('decode_tps'))} "
                      f"tokens/s = **{num(sv['decode_ratio_vs_raw'])}×** raw llama-cpp-python on the same file"
                      + (f" (median of {len(pairs)} runs, each right after a raw run: "
                         + ", ".join(f"{x:.2f}" for x in pairs) + ")." if pairs else ".")]
    return "\n".join(lines) + "\n"


def draft_markdown(draft: dict | None, bench: dict) -> list[str]:
    """The report's "teacher with draft" columns: the teacher alone and with the student as its draft model (one
    ``distillery draft`` run, side by side), the student alone from bench; $ per 1,000 calls is the decode of the
    median answer at the bench's machine price; the quality of the teacher with a draft is the teacher's."""
    top = best(draft["rows"]) if draft else None
    if top is None:
        return []
    alone = next(r for r in draft["rows"] if r["temperature"] == 0 and r["draft_max"] == 0)
    usd_h = bench["settings"]["usd_per_hour"]
    answer = ((bench.get("per_call") or {}).get("all") or {}).get("answer_tokens")
    q = bench["quality"]
    student_tps = (bench["summary"]["student"].get("decode_tps") or {}).get("median")

    def per_1k(tps):
        return "-" if not answer or not tps else f"{local_per_call(answer / tps, usd_h) * 1000:.5f}"

    def gold(x):
        return "-" if x is None else f"{100 * x:.1f}"

    acc = "-" if top["acceptance"] is None else f"{100 * top['acceptance']:.0f} %"
    return ["## The teacher with the student as its draft model", "",
            f"| | teacher alone | teacher + draft (length {top['draft_max']}) | student alone (bench) |",
            "|---|---:|---:|---:|",
            f"| decode tokens/s | {alone['decode_tps']:.1f} | {top['decode_tps']:.1f} "
            f"({top['speedup']:.2f}×) | {'-' if student_tps is None else f'{student_tps:.1f}'} |",
            f"| draft acceptance, tokens per teacher pass | | {acc}, {top['tokens_per_teacher_pass']:.2f} | |",
            f"| $ per 1,000 calls (decode, {answer or 0:.0f}-token answers) | {per_1k(alone['decode_tps'])} | "
            f"{per_1k(top['decode_tps'])} | {per_1k(student_tps)} |",
            f"| held-out gold % | {gold(q['teacher_gold'])} | {gold(q['teacher_gold'])} (the teacher's greedy "
            f"output: {top.get('same_text_as_teacher', '-')}/{top['prompts']} answers the same text) | "
            f"{gold(q['student_gold'])} |", "",
            f"From `distillery draft` ({top['prompts']} held-out prompts, {draft['threads']} threads, teacher and "
            "teacher + draft alternating in one run; runs/RECIPE/draft.md has every draft length).", ""]
