"""Write data/raw/headline_sentiment.jsonl: 150 hand-written, labelled financial headlines for finsynth.

Every headline below was written by hand for this project (no templates, no generation): 50 positive,
50 negative and 50 neutral, labelled from the point of view of the company's shareholders, in the style
of wire headlines. All companies are fictional, and none of the headlines or company names of the
30-headline sample set (scripts/make_sample_qa.py) is reused. Rows have the same shape as that set's
sentiment rows. Labels are interleaved (positive, negative, neutral, positive, ...) so any prefix of the
file is balanced; question wordings rotate independently of the label. Deterministic: rerunning it
rewrites the same bytes. Used by the `quality` profile (configs/quality.yaml).

    python scripts/make_headlines.py [--out data/raw/headline_sentiment.jsonl]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sample_qa import BANKS, BORROWERS, SENT_Q, item, write_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "data" / "raw" / "headline_sentiment.jsonl"
SAMPLE = ROOT / "data" / "raw" / "sample_source_qa.jsonl"
LABELS = ["positive", "negative", "neutral"]
# company names used by the sample set (its loan tables and its headlines); none may appear here
SAMPLE_NAMES = BANKS + BORROWERS + [
    "Veltra Energy", "Castellan Insurance", "Bluefin Payments", "Tessaro Motors", "Northgate REIT",
    "Altavista Telecom", "Pomona Securities", "Galloway Bank", "Lumen Chips", "Pellham Retail", "Sable Foods"]

# (difficulty, headline); "medium" where the label needs a step of reasoning (a narrower loss, a lower
# combined ratio, a dismissed lawsuit) rather than a plainly good or bad word.
E, M = "easy", "medium"
HEADLINES: dict[str, list[tuple[str, str]]] = {
    "positive": [
        (E, "Brackwater Bank lifts quarterly profit 18% to 412 million EUR, beating forecasts"),
        (E, "Ostrava Mining raises copper output target after new shaft comes on stream"),
        (E, "Pinecrest Insurance announces 500 million USD share buyback"),
        (E, "Halvorsen Shipping wins eight-vessel charter contract from a major oil producer"),
        (E, "Credit rating agency revises Wexford Utilities outlook to positive"),
        (E, "Coralline Therapeutics receives regulatory approval for its migraine treatment"),
        (E, "Tidewell Retail posts 9% rise in like-for-like holiday sales"),
        (E, "Skyreach Airways reports record summer load factor of 91%"),
        (E, "Nanoforge Semiconductor sales jump 34% on data-centre chip demand"),
        (E, "Ashby Park REIT raises its annual dividend for the 15th consecutive year"),
        (E, "Marlowe Telecom agrees to be acquired at a 40% premium to its last close"),
        (E, "Quillon Software annual recurring revenue tops 1 billion USD, ahead of plan"),
        (M, "Brennock Brewing narrows first-half loss to 3.1 million GBP from 11.4 million"),
        (M, "Court dismisses patent lawsuit against Vantor Medical Devices"),
        (M, "Kilbride Chemicals operating margin widens to 14.2% as input costs ease"),
        (E, "Saltmarsh Foods opens new plant, doubling its frozen-food capacity"),
        (E, "Ironvale Rail secures 2.3 billion EUR order for 120 commuter trains"),
        (E, "Analysts upgrade Fairhaven Asset Management to buy after strong fund inflows"),
        (M, "Cobalt Ridge Resources drills high-grade gold intercepts at its flagship project"),
        (M, "Rosmarin Hotels revenue per available room climbs 22% in the third quarter"),
        (E, "Glenmore Homes order book reaches a record 6,400 units"),
        (M, "Orsolya Pharma settles product-liability claims for less than it had set aside"),
        (E, "Stellan Solar wins 25-year power purchase agreement for an 800 MW park"),
        (E, "Wendover Logistics raises 2025 earnings guidance on strong e-commerce volumes"),
        (M, "Bexley Mutual Insurance combined ratio improves to 91.5% from 97.8%"),
        (M, "Thornbury Bank's non-performing loan ratio falls to its lowest level in a decade"),
        (E, "Calder Steelworks resumes dividend payments after a three-year pause"),
        (E, "Peregrine Aerospace books 60 aircraft orders at the air show"),
        (E, "Larchmont Media adds 2.1 million subscribers, beating estimates"),
        (E, "Yarrow Agritech net profit up 27% to 63 million EUR on higher fertilizer prices"),
        (M, "Regulator approves Danforth Grid's 1.2 billion USD rate increase request in full"),
        (E, "Eastlake Gaming shares soar after its casino licence is renewed for 20 years"),
        (M, "Hollins Paper sells loss-making packaging unit for more than its book value"),
        (E, "Quintara Biotech signs licensing deal worth up to 900 million USD with a large drugmaker"),
        (E, "Redfern Defence awarded multi-year missile maintenance contract"),
        (M, "Cresswell Cable free cash flow triples as its network build-out spending peaks"),
        (E, "Montague Capital Markets trading revenue rises 31% in its best quarter since 2021"),
        (E, "Amberly Cosmetics shares climb 15% as Asian demand rebounds"),
        (E, "Vireo Energy discovers large offshore gas field, with reserves put at 3 trillion cubic feet"),
        (M, "Hartwell Motors' electric-vehicle unit turns a profit for the first time"),
        (M, "Lindqvist Timber pushes through 8% price rise with no loss of volume"),
        (E, "Pelican Bay Cruises bookings for next season run 30% above pre-pandemic levels"),
        (E, "Sorrel Semiconductors wins supply deal with a leading smartphone maker"),
        (E, "Fenmoor Water wins favourable five-year tariff settlement from regulator"),
        (M, "Kingsbarn Foods completes cost programme, saving 120 million USD a year"),
        (E, "Ambrose Health membership swells by 400,000, outpacing rivals"),
        (E, "Tavistock Ports container throughput hits an all-time high in March"),
        (E, "Greywell Bank passes stress test with the largest capital buffer among its peers"),
        (M, "Brightwater Clinics expands into Germany with an earnings-accretive purchase of 14 diagnostic centres"),
        (E, "Oxley Instruments lands its largest ever single order, from a battery maker"),
    ],
    "negative": [
        (E, "Brixton Lane Bank quarterly profit falls 41% as trading income dries up"),
        (E, "Halden Air cancels 1,800 flights amid pilot strike"),
        (E, "Corwin Insurance ordered to pay 85 million USD penalty over mis-sold policies"),
        (E, "Dunmore Copper halts production at its largest mine after tailings dam breach"),
        (E, "Fairlight Retail to close 140 stores as sales slump"),
        (E, "Penhallow Chips cuts annual revenue forecast for the second time this year"),
        (E, "Analyst downgrades Gracemoor Utilities to sell, citing regulatory risk"),
        (E, "Rathlin Pharma recalls blood-pressure drug over contamination concerns"),
        (E, "Calloway Shipping slumps to 72 million USD half-year loss as freight rates collapse"),
        (E, "Westbury REIT occupancy drops to 81% as office tenants leave"),
        (E, "Tarnwood Software delays flagship product launch; key customer cancels contract"),
        (E, "Mossgiel Motors chief executive resigns abruptly amid accounting probe"),
        (E, "Holloway Homes shares tumble 18% after completions miss guidance"),
        (E, "Elmstead Telecom loses bid for national network licence, shares fall"),
        (E, "Sutherland Bancorp discloses 300 million USD loss on fraudulent loans"),
        (E, "Fosdyke Chemicals fined 40 million EUR for river pollution"),
        (E, "Juniper Vale Foods warns of margin squeeze as grain costs jump"),
        (E, "Bramwell Engineering writes down 1.1 billion GBP on troubled contracts"),
        (E, "Antrim Offshore Drilling files for bankruptcy protection"),
        (E, "Lowther Airlines fleet grounded by safety regulator after engine fault"),
        (M, "Ferrand Semiconductor inventory balloons as PC chip orders dry up"),
        (E, "Cauldwell Asset Management suffers 6 billion USD of client withdrawals in the quarter"),
        (E, "Shareholders sue Northam Biotech over misleading trial disclosures"),
        (E, "Pendle Steel to cut 2,500 jobs as demand from carmakers collapses"),
        (M, "Ravensworth Insurance earnings hit by 900 million USD of hurricane claims"),
        (E, "Oakhurst Media advertising revenue drops 17%, its steepest decline in a decade"),
        (E, "Grantley Power's nuclear plant restart postponed again as costs overrun"),
        (E, "Wickham Logistics loses its biggest customer, a contract worth 30% of sales"),
        (M, "Tamarind Hotels breaches loan covenants, seeks waiver from lenders"),
        (E, "Loxley Bank's credit rating lowered two notches on deteriorating asset quality"),
        (E, "Seabright Cruises slashes dividend by 60% as bookings weaken"),
        (E, "Vickery Pharmaceuticals' obesity drug fails to beat placebo in key trial"),
        (M, "Hendry Gold cuts production guidance on lower ore grades"),
        (E, "Data breach at Clearpath Payments exposes 12 million customer records"),
        (E, "Tax authority demands 450 million EUR in back taxes from Ellesmere Brewing"),
        (M, "Marchbank Construction shares suspended pending clarification of its financial position"),
        (E, "Hawksmoor Telecom loses 300,000 mobile subscribers in price war"),
        (E, "Bellingham Foods quarterly sales miss estimates as volumes shrink"),
        (E, "Glasson Tyres plant fire halts output for at least three months"),
        (M, "Ellery Wealth finance chief departs after restatement of two years of accounts"),
        (M, "Dovercourt Solar hit by new import duties on the panels it sources from Asia"),
        (E, "Stratton Auto faces 2 billion USD class action over emissions cheating"),
        (E, "Transport ministry strips Ulverston Rail of its largest operating franchise"),
        (M, "Mayfield Lenders net interest margin shrinks to 1.6% as deposit costs rise"),
        (E, "Harrowgate Retail bonds plunge as it warns on Christmas trading"),
        (M, "Kirkstone Metals loses power supply contract for its smelter, warns of possible closure"),
        (M, "Brackenridge Airlines books 210 million USD loss on fuel hedges"),
        (M, "Cheviot Bank shares slide after supervisor orders it to raise fresh capital"),
        (E, "Wrenfield Gaming operating profit halves as online betting taxes rise"),
        (M, "Langstone Telecom pension deficit widens to 4.8 billion GBP, forcing extra contributions"),
    ],
    "neutral": [
        (E, "Brightmoor Bank sets July 29 as the date of its second-quarter earnings release"),
        (E, "Aldwych Insurance appoints former central bank official as independent non-executive director"),
        (E, "Pemberton Mining publishes notice of annual general meeting"),
        (E, "Wolverton Retail to change its name to Wolverton Group from next month"),
        (E, "Crestline Airways signs lease on new head office two streets from its current site"),
        (M, "Silverbirch Semiconductor confirms 2025 sales forecast of 3.2 billion to 3.4 billion USD given in "
            "February"),
        (E, "Harwick Utilities lists 500 million EUR green bond at par on the Luxembourg exchange"),
        (E, "Ormsby Pharma files annual report with the securities regulator"),
        (E, "Varda Index Services to announce results of its quarterly index review on June 6"),
        (E, "Tollington Shipping sets record date for its previously declared dividend"),
        (E, "Linwood REIT names Sarah Okafor chair of the audit committee"),
        (E, "Carrow Telecom to hold capital markets day in London on November 12"),
        (E, "Dunstan Software shares to trade under a new ticker symbol from Monday"),
        (E, "Ferriby Foods publishes annual sustainability report"),
        (E, "Abbotsford Chemicals appoints new auditor following mandatory rotation"),
        (E, "Glenhaven Bank to host conference call for analysts after its interim report"),
        (E, "Eskdale Power shareholders re-elect all directors at annual meeting"),
        (M, "Kelsall Medical to change its fiscal year end to December from June"),
        (E, "Rookwood Logistics names Frieda Lang head of investor relations"),
        (M, "Braemar Hotels switches its reporting currency to the euro"),
        (M, "Thistledown Gold to release its annual mineral reserves statement in March, as usual"),
        (M, "Sandown Capital updates base prospectus for its euro medium-term note programme"),
        (E, "Ludgate Insurance's new chair takes office as planned on January 1"),
        (E, "Cranleigh Brewing board to meet on Thursday to approve quarterly accounts"),
        (E, "Ambleside Telecom announces total voting rights at month end"),
        (E, "Pontefract Steel gives notice of change of registered office address"),
        (M, "Greenhithe Water redeems its 2025 notes at maturity as scheduled"),
        (M, "Moorfield Retail director moves shares to family trust; beneficial ownership unchanged"),
        (E, "Hamble Marine appoints new company secretary"),
        (M, "Quennell Biotech sets October date for release of phase 2 trial data"),
        (M, "Ardmore Mines stays in benchmark index after quarterly review"),
        (M, "Birchall Software renews revolving credit facility on similar terms"),
        (M, "Fawley Refining begins planned maintenance shutdown at coastal refinery on schedule"),
        (E, "Shotley Ports changes its share registrar"),
        (E, "Otterburn Bank publishes annual Pillar 3 disclosures"),
        (M, "Wetherby Foods sets deadline for dividend reinvestment plan elections"),
        (M, "Stanmore Airlines adopts new format for its monthly traffic statistics"),
        (M, "Rating agency affirms Lyndhurst Realty Trust at BBB with stable outlook"),
        (E, "Ingleby Asset Management publishes monthly net asset value of its flagship fund"),
        (M, "Kettering Rail merges two regional subsidiaries into a single legal entity"),
        (M, "Harcourt Chemicals converts to a European company (SE) under the same management"),
        (E, "Pitlochry Distillers to webcast its results presentation for the first time"),
        (E, "Marlborough Media files definitive proxy statement ahead of annual meeting"),
        (M, "Regulator schedules Westcombe Gas tariff hearing for September 18"),
        (M, "Tressell Software chief executive to retire next year as planned; deputy named successor"),
        (E, "Fernhill Capital appoints joint corporate broker alongside its existing adviser"),
        (E, "Ashdown Homes renews lease on its regional office on existing terms"),
        (M, "Corbridge Medical publishes updated articles of association approved at annual meeting"),
        (M, "Saltire Shipping appoints new paying agent for its bonds"),
        (M, "Beaumont Insurance to publish its sustainability report separately from its annual report"),
    ],
}


def sample_headlines() -> set[str]:
    """The sample set's sentiment headlines, lower-cased."""
    out = set()
    with open(SAMPLE, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row.get("category") == "sentiment":
                out.add(row["context"]["text"].strip().lower())
    return out


def check(headlines: dict[str, list[tuple[str, str]]]) -> None:
    assert list(headlines) == LABELS, list(headlines)
    assert {k: len(v) for k, v in headlines.items()} == {k: 50 for k in LABELS}
    texts = [h for rows in headlines.values() for _, h in rows]
    assert len(texts) == 150
    lower = [h.strip().lower() for h in texts]
    dup = sorted({h for h in lower if lower.count(h) > 1})
    assert not dup, f"duplicate headlines: {dup}"
    assert all(d in (E, M) for rows in headlines.values() for d, _ in rows)
    assert all(h == h.strip() and h for h in texts)
    shared = sorted(set(lower) & sample_headlines())
    assert not shared, f"headlines shared with {SAMPLE.name}: {shared}"
    reused = sorted(n for n in SAMPLE_NAMES for h in lower if n.lower() in h)
    assert not reused, f"sample-set company names reused: {reused}"


def build() -> list[dict]:
    check(HEADLINES)
    out = []
    for k in range(50):  # interleave labels so every prefix of the file is balanced
        for j, label in enumerate(LABELS):
            difficulty, h = HEADLINES[label][k]
            # question wording rotates with (k + j) so each label gets each wording about equally
            out.append(item(f"hl-{len(out) + 1:03d}", "sentiment", SENT_Q[(k + j) % 3], label,
                            task_type="classification", context={"text": h}, difficulty=difficulty,
                            labels=list(LABELS)))
    assert len(out) == 150 and len({r["id"] for r in out}) == 150
    return out


def main() -> None:
    write_main(build, OUT, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
