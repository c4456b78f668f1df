from dawn.models.summary import REFERENCE_PARAMS, format_table, preset_summary


def test_tiny_summary_counts_flops_and_reference_way_costs_more():
    rows = {name.strip(): row for name, *row in preset_summary("tiny", frames=200)}
    params, reference, ours, reference_way = rows["A2V-FDM U-Net (1 step)"]
    assert params > 0 and reference is None
    assert 0 < ours < reference_way  # windowed attention does less work than T x T
    lfg = rows["LFG (total)"]
    assert lfg[2] < lfg[3]  # the source is encoded once, not once per frame
    assert "A2V-FDM U-Net" in format_table("tiny", preset_summary("tiny", frames=16), 16)


def test_reference_figures_are_the_released_counts():
    assert REFERENCE_PARAMS["lfg"] == sum(REFERENCE_PARAMS[f"lfg.{k}"] for k in ("generator", "region_predictor", "bg_predictor"))
