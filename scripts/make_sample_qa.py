"""Write data/raw/sample_source_qa.jsonl: the sample source-QA set written for finsynth.

Deterministic (fixed seed): rerunning it rewrites the same bytes. Numeric items are generated from
formulas with drawn inputs; every answer is computed twice, once in floating point and once in exact
rational arithmetic (fractions.Fraction), and the two must agree before the item is written. The
regulation answers and the labelled headlines are written by hand for this project.

    python scripts/make_sample_qa.py [--out data/raw/sample_source_qa.jsonl]

Next to it, ``demo_source_qa.jsonl``: the first ``DEMO_PER_CATEGORY`` items of each category, the demo
profile's smaller source set (its few minutes go to the market questions it trains on).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from fractions import Fraction as F
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "data" / "raw" / "sample_source_qa.jsonl"
DEMO_PER_CATEGORY = 4
BANKS = ["Northbridge Bank", "Kestrel Savings", "Harborline Bank", "Alder Mutual", "Corvid Capital",
         "Bayside Trust", "Granite Federal", "Lumen Credit Union", "Oakmere Bank", "Tamsin Bancorp"]
BORROWERS = ["Veltra Logistics", "Orinoco Retail", "Fenwick Mining", "Solano Utilities", "Pellham Foods",
             "Drayton Airlines", "Irongate Builders", "Meridian Steel", "Quarry Pharma", "Sable Textiles"]


def money(x: float, cur: str = "USD") -> str:
    return f"{x:,.2f} {cur}" if abs(x - round(x)) > 1e-9 else f"{x:,.0f} {cur}"


def pct(x: float, nd: int = 2) -> str:
    return f"{x:.{nd}f}%"


def check(approx: float, exact: F, tol: float = 1e-9) -> float:
    """The float result must equal the exact rational one; returns it rounded for storage."""
    if abs(approx - float(exact)) > tol * max(1.0, abs(float(exact))):
        raise AssertionError(f"arithmetic mismatch: {approx} vs {float(exact)}")
    return round(float(exact), 6)


def item(iid, category, question, answer, *, task_type="numeric_qa", context=None, values=None,
         difficulty="easy", labels=None, metadata=None):
    row = {"id": iid, "category": category, "task_type": task_type, "question": question, "answer": answer,
           "difficulty": difficulty}
    if context is not None:
        row["context"] = context
    if labels is not None:
        row["labels"] = labels
    meta = dict(metadata or {})
    if values is not None:
        meta["answer_values"] = values
    if meta:
        row["metadata"] = meta
    return row


def val(name, value, unit):
    return {"name": name, "value": value, "unit": unit}


# ----------------------------------------------------------------------------- credit risk
def credit_risk(rng: random.Random) -> list[dict]:
    out, cat = [], "credit_risk"
    for i in range(10):  # EL = PD x LGD x EAD
        pd_bp = rng.choice([25, 50, 80, 120, 150, 200, 250, 300, 400, 500])  # basis points
        lgd = rng.choice([25, 30, 35, 40, 45, 50, 55, 60, 65, 75])
        ead = rng.randrange(200, 5000) * 1000
        el = pd_bp / 10000 * lgd / 100 * ead
        el = check(el, F(pd_bp, 10000) * F(lgd, 100) * ead)
        b = BORROWERS[i % len(BORROWERS)]
        ctx = (f"{BANKS[i]} has a term loan to {b}. The one-year probability of default (PD) is "
               f"{pct(pd_bp / 100)}, loss given default (LGD) is {lgd}% and exposure at default (EAD) is "
               f"{money(ead)}.")
        q = [f"What is the one-year expected loss on the loan to {b}?",
             "Compute the expected loss (EL = PD x LGD x EAD) for this exposure.",
             f"How much expected credit loss should {BANKS[i]} associate with this loan over one year?"][i % 3]
        out.append(item(f"crm-{len(out) + 1:03d}", cat, q,
                        f"{money(el)}. EL = PD x LGD x EAD = {pd_bp / 10000:.4f} x {lgd / 100:.2f} x {ead:,} = {el:,.2f}.",
                        context={"text": ctx}, values=[val("expected_loss", el, "USD")]))
    for i in range(5):  # EAD with a credit conversion factor
        drawn = rng.randrange(100, 900) * 1000
        undrawn = rng.randrange(50, 600) * 1000
        ccf = rng.choice([20, 40, 50, 75, 100])
        ead = check(drawn + ccf / 100 * undrawn, drawn + F(ccf, 100) * undrawn)
        ctx = (f"A revolving credit facility of {money(drawn + undrawn)} to {BORROWERS[-1 - i]} is drawn by "
               f"{money(drawn)}. The credit conversion factor (CCF) for the undrawn commitment is {ccf}%.")
        out.append(item(f"crm-{len(out) + 1:03d}", cat,
                        "What is the exposure at default of the facility (drawn amount plus CCF times the undrawn amount)?",
                        f"{money(ead)}. EAD = {drawn:,} + {ccf / 100:.2f} x {undrawn:,} = {ead:,.2f}.",
                        context={"text": ctx}, values=[val("ead", ead, "USD")], difficulty="medium"))
    for i in range(5):  # LGD from a recovery rate, then EL
        rec = rng.choice([20, 35, 40, 55, 60, 70])
        pd_bp = rng.choice([100, 150, 200, 300])
        ead = rng.randrange(100, 2000) * 1000
        lgd = 100 - rec
        el = check(pd_bp / 10000 * lgd / 100 * ead, F(pd_bp, 10000) * F(lgd, 100) * ead)
        ctx = (f"For a senior unsecured bond holding in {BORROWERS[i + 2]}, the expected recovery rate in default is "
               f"{rec}%. The holding's exposure is {money(ead)} and its one-year PD is {pct(pd_bp / 100)}.")
        out.append(item(f"crm-{len(out) + 1:03d}", cat,
                        "What are the loss given default and the one-year expected loss of this holding?",
                        f"LGD = {lgd}% and EL = {money(el)}. LGD = 1 - recovery rate = 1 - {rec / 100:.2f}; "
                        f"EL = {pd_bp / 10000:.4f} x {lgd / 100:.2f} x {ead:,} = {el:,.2f}.",
                        context={"text": ctx}, values=[val("lgd", float(lgd), "%"), val("expected_loss", el, "USD")],
                        difficulty="medium"))
    for i in range(5):  # portfolio EL from a table
        rows, total, exact = [], 0.0, F(0)
        for j in range(4):
            pd_bp = rng.choice([30, 60, 90, 150, 220, 350])
            lgd = rng.choice([30, 40, 45, 60])
            ead = rng.randrange(100, 3000) * 1000
            total += pd_bp / 10000 * lgd / 100 * ead
            exact += F(pd_bp, 10000) * F(lgd, 100) * ead
            rows.append([f"Loan {chr(65 + j)}", pct(pd_bp / 100), f"{lgd}%", f"{ead:,}"])
        total = check(total, exact)
        out.append(item(f"crm-{len(out) + 1:03d}", cat,
                        "What is the total one-year expected loss of the four-loan portfolio in the table?",
                        f"{money(total)}: the sum over loans of PD x LGD x EAD.",
                        context={"text": f"{BANKS[-1 - i]}'s small corporate portfolio (EAD in USD).",
                                 "table": {"columns": ["Loan", "PD", "LGD", "EAD"], "rows": rows}},
                        values=[val("expected_loss", total, "USD")], difficulty="hard"))
    for i in range(5):  # implied PD
        lgd = rng.choice([40, 45, 50, 60])
        ead = rng.randrange(5, 50) * 100_000
        pd_bp = rng.choice([40, 75, 125, 180, 240])
        el = pd_bp / 10000 * lgd / 100 * ead
        el_exact = F(pd_bp, 10000) * F(lgd, 100) * ead
        implied = check(el / (lgd / 100 * ead) * 100, el_exact / (F(lgd, 100) * ead) * 100)
        ctx = (f"A bank books an expected loss of {money(float(el_exact))} on an exposure of {money(ead)} to "
               f"{BORROWERS[i + 4]}, with an LGD of {lgd}%.")
        out.append(item(f"crm-{len(out) + 1:03d}", cat,
                        "What one-year probability of default is implied by this expected loss?",
                        f"{pct(implied)}. PD = EL / (LGD x EAD) = {float(el_exact):,.2f} / ({lgd / 100:.2f} x {ead:,}).",
                        context={"text": ctx}, values=[val("pd", implied, "%")], difficulty="medium"))
    return out


# ----------------------------------------------------------------------------- capital adequacy
def capital(rng: random.Random) -> list[dict]:
    out, cat = [], "capital_adequacy"
    for i in range(6):
        cet1 = rng.randrange(40, 400) * 100  # USD millions
        rwa = cet1 * rng.randrange(700, 1600) // 100
        r = check(cet1 / rwa * 100, F(cet1, rwa) * 100)
        ok = "meets" if r >= 4.5 else "does not meet"
        out.append(item(f"cap-{len(out) + 1:03d}", cat,
                        "What is the bank's CET1 ratio, and does it meet the Basel III minimum of 4.5%?",
                        f"{pct(r)}; it {ok} the 4.5% minimum. CET1 ratio = CET1 capital / RWA = {cet1:,} / {rwa:,}.",
                        context={"text": f"{BANKS[i]} reports Common Equity Tier 1 capital of USD {cet1:,} million "
                                         f"and risk-weighted assets of USD {rwa:,} million."},
                        values=[val("cet1_ratio", r, "%")]))
    for i in range(6):
        cet1 = rng.randrange(50, 300) * 100
        at1 = rng.randrange(5, 40) * 100
        rwa = rng.randrange(40, 250) * 1000
        r = check((cet1 + at1) / rwa * 100, F(cet1 + at1, rwa) * 100)
        ok = "above" if r >= 6 else "below"
        out.append(item(f"cap-{len(out) + 1:03d}", cat,
                        "Compute the Tier 1 capital ratio. Is it above the 6% Basel III minimum?",
                        f"{pct(r)}, {ok} the 6% minimum. Tier 1 ratio = (CET1 + AT1) / RWA = ({cet1:,} + {at1:,}) / {rwa:,}.",
                        context={"text": f"{BANKS[-1 - i]} (USD millions): CET1 capital {cet1:,}, Additional Tier 1 "
                                         f"capital {at1:,}, risk-weighted assets {rwa:,}."},
                        values=[val("tier1_ratio", r, "%")], difficulty="easy"))
    for i in range(6):
        cet1, at1, t2 = rng.randrange(60, 300) * 100, rng.randrange(5, 30) * 100, rng.randrange(10, 60) * 100
        credit, market, oper = rng.randrange(300, 1500) * 100, rng.randrange(20, 200) * 100, rng.randrange(40, 200) * 100
        rwa = credit + market + oper
        r = check((cet1 + at1 + t2) / rwa * 100, F(cet1 + at1 + t2, rwa) * 100)
        table = {"columns": ["Item", "USD millions"],
                 "rows": [["CET1 capital", f"{cet1:,}"], ["Additional Tier 1", f"{at1:,}"], ["Tier 2", f"{t2:,}"],
                          ["Credit risk RWA", f"{credit:,}"], ["Market risk RWA", f"{market:,}"],
                          ["Operational risk RWA", f"{oper:,}"]]}
        out.append(item(f"cap-{len(out) + 1:03d}", cat,
                        "What is the bank's total capital ratio according to the table?",
                        f"{pct(r)}. Total capital = {cet1 + at1 + t2:,} and total RWA = {rwa:,} "
                        f"(credit + market + operational); ratio = {cet1 + at1 + t2:,} / {rwa:,}.",
                        context={"text": f"Capital position of {BANKS[(i + 3) % len(BANKS)]} at year end.",
                                 "table": table},
                        values=[val("total_capital_ratio", r, "%")], difficulty="hard"))
    for i in range(6):
        ccyb = rng.choice([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
        gsib = rng.choice([0.0, 0.0, 1.0, 1.5])
        cet1_ratio = round(rng.uniform(6.5, 12.0), 1)
        rwa = rng.randrange(50, 400) * 1000
        req = 4.5 + 2.5 + ccyb + gsib
        req_exact = F(45, 10) + F(25, 10) + F(str(ccyb)) + F(str(gsib))
        req = check(req, req_exact)
        gap = check(cet1_ratio - req, F(str(cet1_ratio)) - req_exact)
        amount = check(gap / 100 * rwa, (F(str(cet1_ratio)) - req_exact) / 100 * rwa)
        word = "surplus" if gap >= 0 else "shortfall"
        gs = f", and its G-SIB surcharge is {gsib}%" if gsib else ""
        out.append(item(f"cap-{len(out) + 1:03d}", cat,
                        "What is the bank's combined CET1 requirement (4.5% minimum + 2.5% capital conservation buffer "
                        "+ countercyclical buffer + any G-SIB surcharge), and what is its surplus or shortfall in "
                        "USD millions?",
                        f"Requirement {pct(req)}; {word} of {abs(gap):.2f} percentage points, i.e. USD "
                        f"{abs(amount):,.2f} million ({gap:+.2f}% x {rwa:,}).",
                        context={"text": f"{BANKS[(i + 5) % len(BANKS)]} has a CET1 ratio of {cet1_ratio}% on "
                                         f"risk-weighted assets of USD {rwa:,} million. Its countercyclical buffer "
                                         f"rate is {ccyb}%{gs}."},
                        values=[val("cet1_requirement", req, "%"), val("cet1_gap", gap, "pp"),
                                val("cet1_gap_amount", amount, "USD millions")], difficulty="hard"))
    for i in range(6):
        t1 = rng.randrange(20, 200) * 100
        exposure = t1 * rng.randrange(180, 450) // 10
        lr = check(t1 / exposure * 100, F(t1, exposure) * 100)
        ok = "meets" if lr >= 3 else "does not meet"
        out.append(item(f"cap-{len(out) + 1:03d}", cat,
                        "What is the Basel III leverage ratio and does it meet the 3% minimum?",
                        f"{pct(lr)}; it {ok} the 3% minimum. Leverage ratio = Tier 1 capital / exposure measure = "
                        f"{t1:,} / {exposure:,}.",
                        context={"text": f"{BANKS[(i + 2) % len(BANKS)]} has Tier 1 capital of USD {t1:,} million and a "
                                         f"leverage exposure measure of USD {exposure:,} million."},
                        values=[val("leverage_ratio", lr, "%")]))
    return out


# ----------------------------------------------------------------------------- liquidity
def liquidity(rng: random.Random) -> list[dict]:
    out, cat = [], "liquidity"
    for i in range(8):
        hqla = rng.randrange(100, 900) * 10
        nco = hqla * rng.randrange(55, 130) // 100  # LCRs of roughly 75% to 180%
        lcr = check(hqla / nco * 100, F(hqla, nco) * 100)
        ok = "meets" if lcr >= 100 else "falls short of"
        out.append(item(f"liq-{len(out) + 1:03d}", cat,
                        "What is the bank's liquidity coverage ratio, and does it meet the 100% requirement?",
                        f"{pct(lcr)}; it {ok} the 100% requirement. LCR = HQLA / net cash outflows over 30 days = "
                        f"{hqla:,} / {nco:,}.",
                        context={"text": f"{BANKS[i]} holds USD {hqla:,} million of high-quality liquid assets. Its "
                                         f"total net cash outflows over the next 30 calendar days under the stress "
                                         f"scenario are USD {nco:,} million."},
                        values=[val("lcr", lcr, "%")]))
    for i in range(6):
        outflows = rng.randrange(300, 1200) * 10
        inflows = outflows * rng.randrange(20, 110) // 100
        hqla = outflows * rng.randrange(30, 120) // 100
        capped = min(inflows, 0.75 * outflows)
        capped_exact = min(F(inflows), F(3, 4) * outflows)
        nco = check(outflows - capped, outflows - capped_exact)
        lcr = check(hqla / (outflows - capped) * 100, F(hqla) / (outflows - capped_exact) * 100)
        note = "the inflow cap binds" if inflows > 0.75 * outflows else "the cap does not bind"
        table = {"columns": ["Item (30-day stress)", "USD millions"],
                 "rows": [["Stock of HQLA", f"{hqla:,}"], ["Total cash outflows", f"{outflows:,}"],
                          ["Total cash inflows", f"{inflows:,}"]]}
        out.append(item(f"liq-{len(out) + 1:03d}", cat,
                        "Compute the LCR. Net cash outflows are outflows minus inflows, with inflows capped at 75% of "
                        "outflows.",
                        f"{pct(lcr)}. Net outflows = {outflows:,} - min({inflows:,}, 0.75 x {outflows:,}) = "
                        f"{nco:,.2f} ({note}); LCR = {hqla:,} / {nco:,.2f}.",
                        context={"text": f"Liquidity position of {BANKS[(i + 4) % len(BANKS)]}.", "table": table},
                        values=[val("net_cash_outflows", nco, "USD millions"), val("lcr", lcr, "%")],
                        difficulty="hard"))
    for i in range(5):
        l1 = rng.randrange(500, 1000) * 10
        l2a = rng.randrange(50, 200) * 10
        l2b = rng.randrange(10, 60) * 10
        hqla = l1 + 0.85 * l2a + 0.5 * l2b
        exact = l1 + F(85, 100) * l2a + F(1, 2) * l2b
        # the 40% (Level 2) and 15% (Level 2B) caps must not bind for the simple formula to be right
        assert F(85, 100) * l2a + F(1, 2) * l2b <= F(40, 100) * exact
        assert F(1, 2) * l2b <= F(15, 100) * exact
        hqla = check(hqla, exact)
        out.append(item(f"liq-{len(out) + 1:03d}", cat,
                        "What is the stock of HQLA after haircuts (Level 1: 0%, Level 2A: 15%, Level 2B: 50%)? The "
                        "Level 2 caps do not bind here.",
                        f"USD {hqla:,.2f} million = {l1:,} + 0.85 x {l2a:,} + 0.50 x {l2b:,}.",
                        context={"text": f"{BANKS[(i + 6) % len(BANKS)]} holds (market values, USD millions): Level 1 "
                                         f"assets {l1:,}, Level 2A assets {l2a:,}, Level 2B assets {l2b:,}."},
                        values=[val("hqla", hqla, "USD millions")], difficulty="medium"))
    for i in range(6):
        asf = rng.randrange(400, 1500) * 10
        rsf = rng.randrange(400, 1500) * 10
        n = check(asf / rsf * 100, F(asf, rsf) * 100)
        ok = "meets" if n >= 100 else "falls short of"
        out.append(item(f"liq-{len(out) + 1:03d}", cat,
                        "What is the bank's net stable funding ratio, and does it meet the 100% minimum?",
                        f"{pct(n)}; it {ok} the 100% minimum. NSFR = available stable funding / required stable "
                        f"funding = {asf:,} / {rsf:,}.",
                        context={"text": f"{BANKS[(i + 1) % len(BANKS)]} reports available stable funding of USD "
                                         f"{asf:,} million and required stable funding of USD {rsf:,} million."},
                        values=[val("nsfr", n, "%")]))
    return out


# ----------------------------------------------------------------------------- market risk
Z = {95: (1.645, F(1645, 1000)), 99: (2.326, F(2326, 1000))}


def market_risk(rng: random.Random) -> list[dict]:
    out, cat = [], "market_risk"
    for i in range(8):
        conf = 99 if i % 2 else 95
        z, zx = Z[conf]
        value = rng.randrange(5, 200) * 100_000
        vol = rng.choice([0.8, 1.0, 1.2, 1.5, 1.8, 2.0, 2.5])
        var = check(z * vol / 100 * value, zx * F(str(vol)) / 100 * value)
        out.append(item(f"mkt-{len(out) + 1:03d}", cat,
                        f"What is the one-day {conf}% parametric (normal) VaR of the position? Use z = {z}.",
                        f"{money(var)}. VaR = z x daily volatility x position value = {z} x {vol / 100:.4f} x {value:,}.",
                        context={"text": f"A trading desk holds a USD {value:,} equity position whose daily return "
                                         f"volatility is {vol}%. Returns are assumed normal with zero mean."},
                        values=[val("var", var, "USD")], difficulty="medium"))
    for i in range(5):
        var1 = rng.randrange(10, 500) * 1000
        h = rng.choice([5, 10, 10, 20])
        var_h = var1 * math.sqrt(h)
        # sqrt is irrational: check against an independent Newton iteration on the square
        x = F(var_h)
        assert abs(x * x - var1 * var1 * h) / (var1 * var1 * h) < F(1, 10**12)
        var_h = round(var_h, 6)
        out.append(item(f"mkt-{len(out) + 1:03d}", cat,
                        f"Scale the one-day VaR to a {h}-day horizon with the square-root-of-time rule.",
                        f"{money(var_h)} (rounded). {h}-day VaR = 1-day VaR x sqrt({h}) = {var1:,} x {math.sqrt(h):.4f}.",
                        context={"text": f"{BANKS[i]}'s rates desk has a one-day 99% VaR of {money(var1)}. Daily "
                                         f"returns are assumed independent and identically distributed."},
                        values=[val("var", var_h, "USD")], difficulty="medium"))
    for i in range(6):
        pnl = [x * 1000 for x in rng.sample(range(-900, 700), 12)]
        losses = sorted((-p for p in pnl if p < 0), reverse=True)
        assert len(losses) >= 3
        var = float(losses[1])
        es = check(sum(losses[:2]) / 2, F(sum(losses[:2]), 2))
        rows = [[f"Day {j + 1}", f"{p:,}"] for j, p in enumerate(pnl)]
        out.append(item(f"mkt-{len(out) + 1:03d}", cat,
                        "Using historical simulation with the rule 'VaR is the 2nd-largest loss and expected shortfall "
                        "is the average of the 2 largest losses', what are the VaR and the expected shortfall?",
                        f"VaR = {money(var)}, ES = {money(es)}. The two largest losses are {losses[0]:,} and "
                        f"{losses[1]:,}.",
                        context={"text": "Daily profit and loss (USD) of a portfolio over 12 days; negative numbers "
                                         "are losses.",
                                 "table": {"columns": ["Day", "P&L"], "rows": rows}},
                        values=[val("var", var, "USD"), val("expected_shortfall", es, "USD")], difficulty="hard"))
    for i in range(6):
        v1 = rng.randrange(10, 90) * 10_000
        v2 = rng.randrange(10, 90) * 10_000
        rho = rng.choice([-0.3, 0.0, 0.2, 0.5, 0.8])
        sq = v1 * v1 + v2 * v2 + 2 * rho * v1 * v2
        sq_exact = F(v1 * v1 + v2 * v2) + 2 * F(str(rho)) * v1 * v2
        check(sq, sq_exact, 1e-12)
        vp = math.sqrt(sq)
        assert abs(F(vp) ** 2 - sq_exact) / sq_exact < F(1, 10**12)
        vp = round(vp, 6)
        div = round(v1 + v2 - vp, 6)
        out.append(item(f"mkt-{len(out) + 1:03d}", cat,
                        "What is the combined VaR of the two desks under the variance-covariance method, and how large "
                        "is the diversification benefit?",
                        f"Combined VaR = {money(vp)} (rounded); diversification benefit = {money(div)}. "
                        f"VaR_p = sqrt({v1:,}^2 + {v2:,}^2 + 2 x {rho} x {v1:,} x {v2:,}).",
                        context={"text": f"Desk A has a one-day 99% VaR of {money(v1)} and desk B {money(v2)}. The "
                                         f"correlation between their P&L is {rho}."},
                        values=[val("portfolio_var", vp, "USD"), val("diversification_benefit", div, "USD")],
                        difficulty="hard"))
    return out


# ----------------------------------------------------------------------------- regulation (open QA)
REGULATION = [
    ("What is the minimum Common Equity Tier 1 (CET1) ratio under Basel III?",
     "4.5% of risk-weighted assets, before any buffers."),
    ("What is the minimum Tier 1 capital ratio under Basel III?",
     "6% of risk-weighted assets (CET1 plus Additional Tier 1)."),
    ("What is the minimum total capital ratio under Basel III?",
     "8% of risk-weighted assets (Tier 1 plus Tier 2), before buffers."),
    ("What is the capital conservation buffer and how large is it?",
     ("A buffer of 2.5% of risk-weighted assets, held in CET1 above the minimum; a bank that dips into it faces "
     "restrictions on distributions such as dividends, share buybacks and discretionary bonuses.")),
    ("What is the countercyclical capital buffer?",
     ("An extra CET1 buffer, set by national authorities between 0% and 2.5% of risk-weighted assets, built up when "
     "credit growth is judged excessive and released in a downturn.")),
    ("What range does the Basel III G-SIB capital surcharge cover?",
     "Additional CET1 from 1% to 3.5% of risk-weighted assets, depending on the bank's systemic-importance bucket."),
    ("How is the Basel III leverage ratio defined and what is its minimum?",
     ("Tier 1 capital divided by the total exposure measure (on-balance-sheet assets, derivatives, securities "
     "financing transactions and off-balance-sheet items); the minimum is 3%.")),
    ("How is the liquidity coverage ratio (LCR) defined?",
     ("The stock of high-quality liquid assets divided by total net cash outflows over the next 30 calendar days "
     "under a stress scenario; it must be at least 100%.")),
    ("How is the net stable funding ratio (NSFR) defined?",
     "Available stable funding divided by required stable funding over a one-year horizon; it must be at least 100%."),
    ("What is the difference between the LCR and the NSFR?",
     ("The LCR covers short-term resilience (liquid assets against 30 days of stressed outflows); the NSFR covers "
     "structural funding (stable funding against the liquidity needs of assets over one year).")),
    ("What caps apply to Level 2 assets in the LCR's stock of HQLA?",
     "Level 2 assets may make up at most 40% of the HQLA stock, and Level 2B assets at most 15%, after haircuts."),
    ("What haircut applies to Level 2A assets in the LCR?",
     "A 15% haircut to their current market value."),
    ("What limit applies to cash inflows in the LCR calculation?",
     ("Total inflows that can offset outflows are capped at 75% of total outflows, so at least 25% of outflows must "
     "be covered by HQLA.")),
    ("What are the three pillars of the Basel framework?",
     ("Pillar 1: minimum capital requirements; Pillar 2: supervisory review of capital adequacy and risk management; "
     "Pillar 3: market discipline through public disclosure.")),
    ("What is the difference between the foundation and advanced IRB approaches?",
     ("Under foundation IRB the bank estimates PD and uses supervisory values for LGD and EAD; under advanced IRB the "
     "bank estimates PD, LGD and EAD itself.")),
    ("Which risk measure does the Fundamental Review of the Trading Book (FRTB) use for internal models?",
     "Expected shortfall at a 97.5% confidence level, replacing value-at-risk and stressed VaR."),
    ("How does the Basel traffic-light test classify VaR backtesting results?",
     ("Over 250 trading days of 99% VaR: 0-4 exceptions is the green zone, 5-9 the yellow zone and 10 or more the "
     "red zone, with higher capital multipliers in yellow and red.")),
    ("What is stressed VaR, introduced in Basel 2.5?",
     ("A 10-day, 99% VaR calibrated to a continuous 12-month period of significant financial stress relevant to the "
     "bank's portfolio, added to the normal VaR charge.")),
    ("What is the output floor in the final Basel III reforms?",
     ("Risk-weighted assets from internal models may not fall below 72.5% of those calculated with the standardised "
     "approaches.")),
    ("What is the Basel large exposures limit?",
     ("Exposure to a single counterparty or group of connected counterparties is limited to 25% of Tier 1 capital "
     "(15% between two G-SIBs).")),
    ("What features must Additional Tier 1 instruments have?",
     ("They are perpetual and subordinated, have fully discretionary non-cumulative coupons, no incentive to redeem, "
     "and absorb losses on a going-concern basis through conversion to equity or write-down.")),
    ("What is Tier 2 capital meant to do?",
     ("Absorb losses on a gone-concern basis (in resolution or liquidation); Tier 2 instruments need an original "
     "maturity of at least five years.")),
    ("What is the ICAAP?",
     ("The Internal Capital Adequacy Assessment Process: the bank's own Pillar 2 assessment of the capital it needs "
     "for all material risks, including those not fully captured by Pillar 1.")),
    ("Under the IRB approach, how are expected and unexpected losses covered?",
     ("Expected losses are covered by provisions (loan-loss reserves), while capital requirements cover unexpected "
     "losses, calibrated to a 99.9% confidence level over one year.")),
    ("What is TLAC and what minimum applies to G-SIBs?",
     ("Total Loss-Absorbing Capacity: G-SIBs must hold loss-absorbing capital and debt of at least 18% of "
     "risk-weighted assets and 6.75% of the leverage exposure measure.")),
]


def regulation() -> list[dict]:
    return [item(f"reg-{i + 1:03d}", "banking_regulation", q, a, task_type="open_qa",
                 difficulty="medium" if len(a) > 120 else "easy")
            for i, (q, a) in enumerate(REGULATION)]


# ----------------------------------------------------------------------------- sentiment
HEADLINES = {
    "positive": [
        "Harborline Bank beats quarterly profit estimates as loan growth accelerates",
        "Veltra Energy raises full-year guidance after record refining margins",
        "Rating agency upgrades Castellan Insurance to A+ on stronger capital",
        "Orinoco Retail shares jump 12% after surprise dividend increase",
        "Bluefin Payments wins approval to expand into three new markets",
        "Meridian Steel halves net debt a year ahead of plan",
        "Quarry Pharma's lead drug succeeds in late-stage trial; shares rally",
        "Tessaro Motors posts record deliveries, topping analyst forecasts",
        "Northgate REIT signs long-term leases, lifting occupancy to 97%",
        "Altavista Telecom returns to profit a year earlier than expected",
    ],
    "negative": [
        "Kestrel Savings swings to a loss after surge in bad-loan provisions",
        "Regulator fines Pomona Securities over anti-money-laundering failures",
        "Drayton Airlines cuts outlook as fuel costs soar; stock slides 9%",
        "Rating agency cuts Solano Utilities to junk on rising leverage",
        "Fenwick Mining suspends dividend amid cash shortfall",
        "Galloway Bank hit by deposit outflows after capital shortfall disclosed",
        "Irongate Builders misses bond coupon payment, enters restructuring talks",
        "Lumen Chips issues profit warning on weak smartphone demand",
        "Auditor raises going-concern doubts over Pellham Retail",
        "Sable Foods recalls products nationwide; quarterly sales expected to fall",
    ],
    "neutral": [
        "Harborline Bank to report third-quarter results on October 24",
        "Central bank holds policy rate unchanged, in line with expectations",
        "Veltra Energy names new chief financial officer effective January",
        "Castellan Insurance completes previously announced share consolidation",
        "Orinoco Retail to relocate headquarters within the same city",
        "Bluefin Payments schedules annual general meeting for May 14",
        "Meridian Steel reaffirms full-year outlook",
        "Tessaro Motors lists new bond series on the exchange",
        "Northgate REIT declares regular quarterly dividend, unchanged at $0.42 per share",
        "Quarry Pharma to present at healthcare investor conference next week",
    ],
}
SENT_Q = [
    "Classify the sentiment of this headline for the company's shareholders: positive, negative or neutral.",
    "Is the news in this headline positive, negative or neutral for investors in the company?",
    "What is the sentiment of the following financial headline (positive, negative or neutral)?",
]


def sentiment() -> list[dict]:
    out = []
    for k in range(10):  # interleave labels so nearby ids mix them
        for label in ("positive", "negative", "neutral"):
            h = HEADLINES[label][k]
            out.append(item(f"sen-{len(out) + 1:03d}", "sentiment", SENT_Q[len(out) % 3], label,
                            task_type="classification", context={"text": h},
                            labels=["positive", "negative", "neutral"]))
    return out


def build(seed: int = 2024) -> list[dict]:
    rng = random.Random(seed)
    rows = credit_risk(rng) + capital(rng) + liquidity(rng) + market_risk(rng) + regulation() + sentiment()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))
    return rows


def write_rows(rows: list[dict], out: Path) -> None:
    """One sorted-key JSON object per line, LF line ends (the same bytes on every run)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    print(f"wrote {len(rows)} items to {out}")


def write_main(build_rows, default_out: Path, description: str) -> tuple[list[dict], Path]:
    """The command line of a sample-data script: ``--out`` (default ``default_out``); returns what it wrote."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", type=Path, default=default_out)
    args = ap.parse_args()
    rows = build_rows()
    write_rows(rows, args.out)
    return rows, args.out


def demo_subset(rows: list[dict], per_category: int = DEMO_PER_CATEGORY) -> list[dict]:
    """The first ``per_category`` rows of each category, in file order."""
    seen: dict[str, int] = {}
    out = []
    for r in rows:
        seen[r["category"]] = seen.get(r["category"], 0) + 1
        if seen[r["category"]] <= per_category:
            out.append(r)
    return out


def main() -> None:
    rows, out = write_main(build, OUT, __doc__.splitlines()[0])
    write_rows(demo_subset(rows), out.with_name("demo_source_qa.jsonl"))


if __name__ == "__main__":
    main()
