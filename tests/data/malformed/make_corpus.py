"""Writes the malformed-input corpus next to this file, with EXPECTED.json (what each case must give).

Run ``python tests/data/malformed/make_corpus.py`` after changing a case; the files are committed.
Each expectation: ``kind`` (``rows``: the file loads, rows are kept or quarantined; ``source_error`` /
``market_error``: a file-level error whose one-line message names the file and contains ``match``;
``market_ok``: a price file that loads), ``spec`` (extra SourceQAFile fields), ``rows_in``,
``rows_out``, ``quarantine`` (``[row, field, reason]`` per quarantined row, sorted).
Cases built at test time (a 10 MB cell, a directory) live in tests/test_malformed_inputs.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

HERE = Path(__file__).parent
CASES: dict[str, dict] = {}

def main() -> None:
    H = "id,question,answer,category\n"


    def good(i: int) -> str:
        return f'g{i},"What was net income in 202{i}, in USD million?",{100 + i}.5,earnings\n'


    def case(name: str, data: bytes | str, **exp) -> None:
        (HERE / name).write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        CASES[name] = exp


    def rows(rows_in: int, rows_out: int, quarantine: list | None = None, **kw) -> dict:
        return {"kind": "rows", "rows_in": rows_in, "rows_out": rows_out, "quarantine": quarantine or [], **kw}


    def jl(*objs) -> str:
        return "".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs)


    def q(i: int, **kw) -> dict:
        return {"id": f"g{i}", "question": f"What was net income in 202{i}?", "answer": f"{100 + i}.5",
                "category": "earnings", **kw}


    # ----------------------------------------------------------------------------- CSV
    case("csv_unterminated_quote.csv",
         H + good(1) + good(2) + 'b3,"What was the margin?,14.2%,earnings\n' + good(4) + good(5) + good(6),
         **rows(6, 5, [[3, "<row>", "unterminated_quote"]]))
    case("csv_unterminated_quote_last_row.csv", H + good(1) + good(2) + 'b3,"What was the margin?,14.2%,earnings\n',
         **rows(3, 2, [[3, "<row>", "unterminated_quote"]]))
    case("csv_unterminated_quote_first_row.csv", H + 'b1,"What was the margin?,14.2%,earnings\n' + good(2) + good(3),
         **rows(3, 2, [[1, "<row>", "unterminated_quote"]]))
    case("csv_stray_quote_after_field.csv", H + good(1) + 'b2,"What was the margin?"x,14.2%,earnings\n' + good(3),
         **rows(3, 2, [[2, "<row>", "malformed_row"]]))
    case("csv_extra_cell.csv", H + good(1) + "b2,What was the margin?,14.2%,earnings,surplus\n" + good(3),
         **rows(3, 2, [[2, "<extra cell 5>", "malformed_row"]]))
    case("csv_missing_cell.csv", H + good(1) + "b2,What was the margin?,14.2%\n" + good(3),
         **rows(3, 2, [[2, "category", "malformed_row"]]))
    case("csv_multiline_quoted_ok.csv", H + 'g1,"What was net income\nin 2021?",101.5,earnings\n' + good(2),
         **rows(2, 2))
    case("csv_bom.csv", "\ufeff" + H + good(1) + good(2), **rows(2, 2))
    case("csv_bom_crlf.csv", ("\ufeff" + H + good(1) + good(2)).replace("\n", "\r\n"), **rows(2, 2))
    case("csv_cr_only.csv", (H + good(1) + good(2)).replace("\n", "\r"), **rows(2, 2))
    case("csv_no_final_newline.csv", H + good(1) + good(2).rstrip("\n"), **rows(2, 2))
    case("csv_blank_lines.csv", H + "\n" + good(1) + ",,,\n\n" + good(2), **rows(2, 2))
    case("csv_nul_byte.csv", H + good(1) + "b2,What was the\x00 margin?,14.2%,earnings\n",
         **rows(2, 1, [[2, "question", "nul_byte"]]))
    case("csv_nan_answer.csv",
         H + good(1) + "b2,What was the margin?,NaN,earnings\n" + "b3,What was the yield?,nan,earnings\n",
         **rows(3, 1, [[2, "answer", "non_finite"], [3, "answer", "non_finite"]]))
    case("csv_infinity_answer.csv", H + good(1) + "b2,What was the ratio?,Infinity,earnings\n"
         + "b3,What was the change?,-inf,earnings\n",
         **rows(3, 1, [[2, "answer", "non_finite"], [3, "answer", "non_finite"]]))
    case("csv_latin1.csv",
         H.encode() + good(1).encode() + "b2,Was hat die Bank verdient?,5,Ertr\u00e4ge\n".encode("latin-1"),
         **rows(2, 1, [[2, "category", "undecodable_text"]]))
    case("csv_list_answer.csv", "id,question,answer,category,task_type\n"
         'g1,Which years had a loss?,"[""2019"", ""2021""]",earnings,open_qa\n'
         'g2,What were the two margins?,"[""14.2%"", ""15.1%""]",earnings,numeric_qa\n'
         'g3,Footnote?,[a] see note,earnings,open_qa\n', **rows(3, 3))
    case("csv_bad_json_table.csv", "id,question,answer,category,table\n" + 'g1,Q?,1,c,\n' + 'b2,Q2?,2,c,"[[""a"", ]"\n',
         **rows(2, 1, [[2, "table", "wrong_type"]]))
    case("csv_header_only.csv", H, kind="source_error", match="header only")
    case("csv_header_only_blank_rows.csv", H + "\n,,,\n\n", kind="source_error", match="header only")
    case("csv_empty.csv", "", kind="source_error", match="empty file")
    case("csv_whitespace_only.csv", "\n  \n\n", kind="source_error", match="empty file")
    case("csv_bom_only.csv", "\ufeff", kind="source_error", match="empty file")
    case("csv_duplicate_header.csv", "id,question,answer,answer,category\n" + "g1,Q?,1,2,c\n",
         kind="source_error", match="duplicate column")
    case("csv_missing_answer_column.csv", "id,question,response,category\n" + "g1,Q?,1,c\n",
         kind="source_error", match="column 'answer'")
    case("csv_long_header.csv", "id,question," + "x" * 1000 + ",category\n" + "g1,Q?,1,c\n",
         kind="source_error", match="column 'answer'", max_len=600)
    case("csv_long_bad_value.csv", "id,question,answer,category,task_type\n" + good(1).rstrip("\n") + ",open_qa\n"
         + "b2,Q?,1,c," + "y" * 1000 + "\n", **rows(2, 1, [[2, "task_type", "bad_task_type"]], max_detail=400))

    # ----------------------------------------------------------------------------- JSONL
    case("jsonl_bom.jsonl", "\ufeff" + jl(q(1), q(2)), **rows(2, 2))
    case("jsonl_bom_every_line.jsonl", "".join("\ufeff" + ln for ln in jl(q(1), q(2)).splitlines(True)), **rows(2, 2))
    case("jsonl_crlf.jsonl", jl(q(1), q(2)).replace("\n", "\r\n"), **rows(2, 2))
    case("jsonl_empty.jsonl", "", kind="source_error", match="empty file")
    case("jsonl_blank_lines_only.jsonl", "\n\n  \n", kind="source_error", match="empty file")
    case("jsonl_nan_answer.jsonl",
         jl(q(1), '{"id": "b2", "question": "Margin?", "answer": NaN, "category": "earnings"}'),
         **rows(2, 1, [[2, "answer", "non_finite"]]))
    case("jsonl_infinity_answer.jsonl",
         jl(q(1), '{"id": "b2", "question": "Ratio?", "answer": -Infinity, "category": "x"}'),
         **rows(2, 1, [[2, "answer", "non_finite"]]))
    case("jsonl_nan_string_answer.jsonl", jl(q(1), q(2, answer="NaN"), q(3, answer=" inf ")),
         **rows(3, 1, [[2, "answer", "non_finite"], [3, "answer", "non_finite"]]))
    case("jsonl_nan_in_metadata.jsonl", jl(q(1), '{"id": "b2", "question": "Q?", "answer": "1", "category": "x", '
                                           '"metadata": {"answer_values": [{"name": "a", "value": NaN}]}}'),
         **rows(2, 1, [[2, "metadata", "non_finite"]]))
    case("jsonl_nul_escaped.jsonl", jl(q(1), q(2, question="What was\u0000 the margin?")),
         **rows(2, 1, [[2, "question", "nul_byte"]]))
    case("jsonl_nul_raw.jsonl",
         jl(q(1)).encode() + b'{"id": "b2", "question": "What\x00?", "answer": "1", "category": "x"}\n',
         **rows(2, 1, [[2, "<row>", "nul_byte"]]))
    case("jsonl_not_an_object.jsonl", jl(q(1), [1, 2], "null"),
         **rows(3, 1, [[2, "<row>", "wrong_type"], [3, "<row>", "wrong_type"]]))
    case("jsonl_truncated_last_line.jsonl", jl(q(1)) + '{"id": "b2", "question": "Margin?", "ans',
         **rows(2, 1, [[2, "<row>", "invalid_json"]]))
    case("jsonl_list_answer.jsonl", jl(q(1, answer=["2019", "2021"], question="Which years had a loss?"),
                                       q(2, answer=["14.2%", "15.1%"], task_type="numeric_qa")), **rows(2, 2))
    case("jsonl_empty_list_answer.jsonl", jl(q(1), q(2, answer=[])), **rows(2, 1, [[2, "answer", "empty"]]))
    case("jsonl_list_of_objects_answer.jsonl", jl(q(1), q(2, answer=[{"a": 1}])),
         **rows(2, 1, [[2, "answer", "wrong_type"]]))
    case("jsonl_list_answer_classification.jsonl",
         jl(q(1, answer="up", task_type="classification", labels=["up", "down"]),
            q(2, answer=["up", "down"], task_type="classification", labels=["up", "down"])),
         **rows(2, 1, [[2, "answer", "wrong_type"]]))
    # strings that break Markdown and HTML: kept as data (the card and report escape them when they render)
    case("jsonl_hostile_strings.jsonl", jl(q(1, category="banking | retail"), q(2, category="a\nb"),
                                          q(3, category="<script>alert(1)</script>"),
                                          q(4, category="<img src=x onerror=alert(1)>", question="`x` | <b>?")),
         **rows(4, 4))
    case("jsonl_scaled_numbers.jsonl", jl(*(q(i, answer=a, task_type="numeric_qa") for i, a in enumerate(
        ["14.16 percent", "-7 million", "$1.2bn", "(3.4)", "1,234.5", "12%"], start=1))), **rows(6, 6))

    DOC = {"table": {"uid": "t1", "table": [["", "2023", "2024"], ["Net sales", "1,200", "1,350"],
                                              ["Net income", "80", "95"]]},
           "paragraphs": [{"uid": "p1", "order": 1, "text": "Amounts in USD million."},
                          {"uid": "p2", "order": 2, "text": "Net sales grew on volume."}],
           "questions": [{"uid": "q1", "question": "What was the percentage change in net sales?",
                          "answer": "12.5 percent", "answer_type": "arithmetic"},
                         {"uid": "q2", "question": "What was the percentage change in net income?",
                          "answer": "18.75 percent", "answer_type": "arithmetic"},
                         {"uid": "q3", "question": "Which years are shown?", "answer": ["2023", "2024"],
                          "answer_type": "multi-span"}]}
    DOC2 = {**DOC, "table": {"uid": "t2", "table": [["", "2024"], ["Cash", "40"]]},
            "questions": [{"uid": "q4", "question": "How much cash?", "answer": 40},
                          {"uid": "q5", "question": "", "answer": "x"}]}
    NESTED = {"records_path": "questions", "category": "annual_report", "task_type": "numeric_qa",
              "columns": {"id": "uid", "table": "table.table", "paragraphs": "paragraphs"}}
    case("json_nested_documents.json", json.dumps([DOC, DOC2], indent=1),
         spec=NESTED, **rows(5, 4, [[5, "question", "empty"]]))
    case("jsonl_nested_documents.jsonl", jl(DOC, {"table": DOC["table"], "paragraphs": []}, {**DOC2, "questions": []}),
         spec={**NESTED, "columns": {**NESTED["columns"], "id": "uid"}},
         **rows(5, 3, [[4, "questions", "missing"], [5, "questions", "empty"]]))
    case("json_array.json", json.dumps([q(1), q(2)]), **rows(2, 2))
    case("json_single_object_with_records_path.json", json.dumps({"source": "x", "data": [q(1), q(2)]}),
         spec={"records_path": "data"}, **rows(2, 2))
    case("json_empty_array.json", "[]", kind="source_error", match="no records")
    case("json_invalid.json", '[{"question": "Q?"', kind="source_error", match="unreadable JSON")
    case("json_nan_answer.json", '[{"question": "Q?", "answer": NaN, "category": "x"}, ' + json.dumps(q(2)) + "]",
         **rows(2, 1, [[1, "answer", "non_finite"]]))

    # ----------------------------------------------------------------------------- Parquet
    pd.DataFrame({"question": ["Q1?", "Q2?", "Q3?"], "answer": [1.5, float("inf"), float("nan")],
                  "category": ["x", "x", "x"]}).to_parquet(HERE / "parquet_non_finite.parquet", index=False)
    CASES["parquet_non_finite.parquet"] = rows(3, 1, [[2, "answer", "non_finite"], [3, "answer", "missing"]])
    pd.DataFrame({"question": pd.Series([], dtype=str), "answer": pd.Series([], dtype=str)}).to_parquet(
        HERE / "parquet_zero_rows.parquet", index=False)
    CASES["parquet_zero_rows.parquet"] = {"kind": "source_error", "match": "no rows"}
    pd.DataFrame({"\ufeffquestion": ["Q1?"], "answer": ["1"], "category": ["x"]}).to_parquet(
        HERE / "parquet_bom_column.parquet", index=False)
    CASES["parquet_bom_column.parquet"] = rows(1, 1)
    pd.DataFrame({"question": ["Q1?", "Q2?"], "answer": [["a", "b"], []], "category": ["x", "x"]}).to_parquet(
        HERE / "parquet_list_answer.parquet", index=False)
    CASES["parquet_list_answer.parquet"] = rows(2, 1, [[2, "answer", "empty"]])

    # ----------------------------------------------------------------------------- price files
    PH = "Date,Open,High,Low,Close,Volume\n"


    def price(i: int, sep: str = ",") -> str:
        c = 100 + i
        cells = [f"2024-03-{i + 1:02d}", f"{c:.2f}", f"{c + 1:.2f}", f"{c - 1:.2f}", f"{c + 0.5:.2f}", str(1000 + i)]
        return sep.join(cells) + "\n"


    idx = pd.date_range("2024-03-01", periods=12, freq="B")
    px = pd.DataFrame({"Open": range(100, 112), "High": range(101, 113), "Low": range(99, 111),
                       "Close": [x + 0.5 for x in range(100, 112)], "Volume": range(1000, 1012)}, index=idx)
    px.to_csv(HERE / "market_pandas_unnamed_index.csv")  # header ",Open,High,..."
    CASES["market_pandas_unnamed_index.csv"] = {"kind": "market_ok", "rows": 12}
    px.reset_index().rename(columns={"index": "Unnamed: 0"}).to_csv(HERE / "market_pandas_unnamed_0.csv", index=False)
    CASES["market_pandas_unnamed_0.csv"] = {"kind": "market_ok", "rows": 12}
    case("market_bom_crlf.csv", ("\ufeff" + PH + "".join(price(i) for i in range(5))).replace("\n", "\r\n"),
         kind="market_ok", rows=5)
    case("market_header_only.csv", PH, kind="market_error", match="market_header_only.csv: no data rows")
    case("market_empty.csv", "", kind="market_error", match="market_empty.csv: empty file")
    case("market_extra_cell.csv", PH + price(0) + price(1).rstrip("\n") + ",77\n" + price(2),
         kind="market_error", match="row 2: field <extra cell 7>")
    case("market_unterminated_quote.csv", PH + price(0) + '2024-03-02,"101.00,102.00,100.00,101.50,1001\n' + price(2),
         kind="market_error", match="row 2:")
    case("market_unnamed_first_column_not_dates.csv", ",Open,High,Low,Close,Volume\n0,1,2,0.5,1.5,10\n",
         kind="market_error", match="missing column")
    (HERE / "EXPECTED.json").write_text(json.dumps(dict(sorted(CASES.items())), indent=1) + "\n")
    print(len(CASES), "cases")


if __name__ == "__main__":
    main()
