from encodenet_timm.row_names import ordered_rows


def test_rows_take_one_order_whatever_order_they_come_in():
    rows = ["ema", "kd@t1", "paper", "continued", "encodenet@t1", "baseline", "zeta", "kd", "encodenet", "equal", "ae_only"]
    want = ["baseline", "encodenet", "encodenet@t1", "paper", "ae_only", "zeta", "continued", "kd", "kd@t1", "ema",
            "equal"]
    assert ordered_rows(rows, ["paper"]) == want  # named variants in their order, the others by name
    assert ordered_rows(reversed(rows), ["paper"]) == want
    assert ordered_rows(rows, ["zeta", "paper"])[3:6] == ["zeta", "paper", "ae_only"]
