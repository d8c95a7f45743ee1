"""Figures and tables a researcher reads (issue 18, items 4, 5, 7 and 8), in a real headless Chromium
(Debian's) driven by Playwright against the one app server of the session (``app_url``). Screenshots at
1440x900 and 1280x720 go to tests/screenshots/test_*-*.png: look at them after changing these pages."""

from __future__ import annotations

from conftest import generate_in_browser, needs_chromium, no_streamlit_exception
from test_browser_pages import choose, idle, set_number

pytestmark = needs_chromium


def shots(page, name: str) -> None:
    """Screenshots of the whole page at 1440x900 and at a projector's 1280x720 (the viewport stretched to
    the content's height, as Streamlit scrolls inside its own container), then back to 1440x900."""
    for width, height in ((1440, 900), (1280, 720)):
        page.set_viewport_size({"width": width, "height": height})
        idle(page)
        tall = page.evaluate("() => document.querySelector('[data-testid=stMain]').scrollHeight")
        page.set_viewport_size({"width": width, "height": max(height, int(tall) + 40)})
        page.wait_for_timeout(800)
        page.shot(f"{name}-{width}")
    page.set_viewport_size({"width": 1440, "height": 900})


def title_clear_of_toolbar(page, title: str) -> None:
    """Hover the chart titled ``title`` so plotly shows its toolbar, and check the two do not overlap."""
    from playwright.sync_api import expect

    chart = page.locator("[data-testid='stPlotlyChart']").filter(has_text=title).first
    chart.scroll_into_view_if_needed()
    chart.hover()
    bar = chart.locator(".modebar").first
    expect(bar).to_be_visible()
    text = chart.locator(".gtitle").first.bounding_box()
    box = bar.bounding_box()
    overlap = not (
        text["x"] + text["width"] <= box["x"]
        or box["x"] + box["width"] <= text["x"]
        or text["y"] + text["height"] <= box["y"]
        or box["y"] + box["height"] <= text["y"]
    )
    assert not overlap, f"plotly's toolbar {box} covers the title {text}"


def test_sweep_plot_shows_changes_against_dense_with_paired_errors(app_url, page):
    """Item 4: the Compare page's sweep plot is Δ vs dense with paired errors by default; the absolute,
    unpaired view is one click away; no toolbar over the title."""
    from playwright.sync_api import expect

    page.goto(app_url)
    expect(page.get_by_text("Active model: tiny-dlm", exact=False).first).to_be_visible()
    page.locator("[data-testid='stSidebarNav']").get_by_role("link", name="Compare", exact=True).click()
    idle(page)
    set_number(page, "Windows", "1")
    set_number(page, "Monte Carlo draws", "2")
    page.get_by_role("button", name="Remove wanda").click()  # magnitude at 0.5 only
    page.get_by_role("button", name="Remove 0.3").click()
    page.get_by_role("button", name="Run sweep").click()
    title = "Perplexity after pruning: change against the dense model"
    expect(page.get_by_text(title, exact=False)).to_be_visible()
    expect(page.get_by_text("±2 paired standard errors of the difference", exact=False)).to_be_visible()
    expect(page.get_by_text("Δ perplexity vs dense (%)", exact=False)).to_be_visible()
    title_clear_of_toolbar(page, title)
    grid = page.locator("[data-testid='stDataFrame']").last  # the sweep table fits the page
    widths = grid.locator(".dvn-scroller").first.evaluate("e => [e.scrollWidth, e.clientWidth]")
    assert widths[0] <= widths[1] + 1, f"the sweep table is {widths[0]} px wide in a {widths[1]} px box"
    shots(page, "delta")
    page.get_by_text("perplexity (each row's own error)").click()
    # the absolute view's own title (while Streamlit reruns, the Δ figure can still be on the page for a moment)
    expect(page.get_by_text("Perplexity after pruning (lower is better)", exact=False)).to_be_visible()
    expect(page.get_by_text("unpaired", exact=False).first).to_be_visible()
    expect(page.get_by_text(title, exact=False)).to_have_count(0)
    no_streamlit_exception(page)


def test_tau_sweep_on_a_numeric_axis_names_a_best_tau_only_beyond_the_noise(app_url, page):
    """Item 4: Pick tau's sweep puts the taus at their values (0.05 is five times as far from 0 as 0.01)
    and says, for each gated method, either its best tau or plainly that no tau beats the official rule."""
    from playwright.sync_api import expect

    page.goto(app_url)
    expect(page.get_by_text("Active model: tiny-dlm", exact=False).first).to_be_visible()
    page.locator("[data-testid='stSidebarNav']").get_by_role("link", name="Pick tau", exact=True).click()
    page.get_by_role("spinbutton", name="Calibration samples").fill("2")  # inside forms: no rerun
    page.get_by_role("spinbutton", name="Calibration length").fill("32")
    page.get_by_role("spinbutton", name="Evaluation windows").fill("1")
    page.get_by_role("textbox", name="Taus").fill("0, 0.01, 0.05")
    page.get_by_role("button", name="Run the tau sweep").click()
    expect(page.get_by_text("From the last completed tau sweep", exact=False)).to_be_visible()
    idle(page)
    verdict = page.get_by_text("best tau =", exact=False).or_(page.get_by_text("no tau beats sink_wanda beyond 2", exact=False))
    expect(verdict.first).to_be_visible()
    chart = page.locator("[data-testid='stPlotlyChart']").filter(has_text="Perplexity against tau").first
    chart.scroll_into_view_if_needed()
    expect(chart.locator(".xtick text")).to_have_count(3)  # drawn
    boxes = {t.text_content(): t.bounding_box() for t in chart.locator(".xtick text").all()}
    ticks = {label: box["x"] + box["width"] / 2 for label, box in boxes.items()}  # centres: labels differ in width
    assert set(ticks) == {"0", "0.01", "0.05"}, ticks
    assert abs((ticks["0.05"] - ticks["0"]) / (ticks["0.01"] - ticks["0"]) - 5) < 0.2, ticks  # numeric, not evenly spaced
    title_clear_of_toolbar(page, "Perplexity against tau")
    shots(page, "tau")
    no_streamlit_exception(page)


def test_stability_labels_tables_and_the_meaning_of_tau_zero(app_url, page):
    """Items 5, 7 and 8 on Sink stability: the all-layers row is named, the tables fit the page at 1280
    px, the newline token is shown as ⏎, tau = 0's "every sink unstable" is explained right there, and
    moving tau redraws the labels and says what it does."""
    from playwright.sync_api import expect

    page.set_viewport_size({"width": 1280, "height": 720})
    generate_in_browser(page, app_url, 16)
    page.locator("[data-testid='stSidebarNav']").get_by_role("link", name="Sink stability", exact=True).click()
    expect(page.get_by_text("Per-position sink stability", exact=False)).to_be_visible()
    expect(page.get_by_text("Why every sink is unstable here", exact=False)).to_be_visible()
    expect(page.get_by_text("Stable sinks", exact=True)).to_be_visible()
    expect(page.get_by_text("never runs the model", exact=False).first).to_be_visible()
    page.get_by_text("Per-position table", exact=False).click()
    page.get_by_text("Per-layer table", exact=False).click()
    page.get_by_text("Which heads hold the sinks?", exact=False).click()
    idle(page)
    grids = page.locator("[data-testid='stDataFrame']")
    expect(grids).to_have_count(3)  # positions, layers, the heads ranked by their sink score
    for i in range(3):  # no column cut off on the right: the grid's content is no wider than the grid
        widths = grids.nth(i).locator(".dvn-scroller").first.evaluate("e => [e.scrollWidth, e.clientWidth]")
        assert widths[0] <= widths[1] + 1, f"table {i} is {widths[0]} px wide in a {widths[1]} px box"
    # the grids draw on a canvas; their accessible table (glide-data-grid's) holds the visible cells' text
    cells = [grids.nth(i).locator("[role=gridcell]").all_text_contents() for i in range(2)]
    assert cells[1][0] == "all layers" and "-1" not in cells[1], cells[1]  # the per-layer table's first row
    assert "⏎" in cells[0]  # the prompt's newline token
    heads = grids.nth(2).locator("[role=columnheader]").all_text_contents()
    assert [h for h in heads if h in ("rank", "layer", "head", "position", "score")] == [
        "rank",
        "layer",
        "head",
        "position",
        "score",
    ]
    shots(page, "tau0")
    # raising tau separates the sinks: the explanation goes, the figure's tau line moves
    slider = page.get_by_role("slider", name="tau (variance threshold)")
    slider.focus()
    for _ in range(4):
        slider.press("ArrowRight")
    idle(page)
    expect(page.get_by_text("Why every sink is unstable here", exact=False)).to_have_count(0)
    expect(page.locator("[data-testid='stPlotlyChart'] svg text", has_text="tau = 0.02")).to_have_count(1)
    no_streamlit_exception(page)


def test_prune_shows_the_down_weighted_tokens_and_compare_wraps_at_words(app_url, page):
    """Item 8: after a gated prune the page draws the calibration tokens' factors, official rule against
    gated, with hovers; item 5: Compare shows the generations as running text (no ␣ markers, wrapped at
    word boundaries) and says why its decoding defaults differ from the explorer's."""
    from playwright.sync_api import expect

    page.goto(app_url)
    expect(page.get_by_text("Active model: tiny-dlm", exact=False).first).to_be_visible()
    page.locator("[data-testid='stSidebarNav']").get_by_role("link", name="Prune", exact=True).click()
    choose(page, "Method", "gated_sink_wanda")
    page.get_by_role("spinbutton", name="Calibration samples").fill("2")
    page.get_by_role("spinbutton", name="Calibration length").fill("48")
    page.get_by_role("button", name="Prune", exact=True).click()
    expect(page.get_by_text("Made gated_sink_wanda 50%", exact=False)).to_be_visible()
    title = "Which calibration tokens were down-weighted"
    expect(page.get_by_text(title, exact=False)).to_be_visible()
    strip = page.locator("[data-testid='stPlotlyChart']").filter(has_text=title).first
    expect(strip.get_by_text("official rule (no gate)")).to_be_visible()
    expect(strip.get_by_text("gated at tau = 0", exact=True)).to_be_visible()
    expect(page.get_by_text("this variant used the gated row", exact=False)).to_be_visible()
    area = strip.locator(".nsewdrag").first
    area.scroll_into_view_if_needed()
    height = area.bounding_box()["height"]
    area.hover(position={"x": 4, "y": height * 0.25})  # position 0 of the official row
    area.hover(position={"x": 5, "y": height * 0.25})
    expect(strip.locator(".hoverlayer")).to_contain_text("position 0")
    expect(strip.locator(".hoverlayer")).to_contain_text("mean sink score")
    title_clear_of_toolbar(page, title)
    shots(page, "prune")

    page.locator("[data-testid='stSidebarNav']").get_by_role("link", name="Compare", exact=True).click()
    expect(page.get_by_text("Decoding defaults differ from the Denoising explorer's", exact=False)).to_be_visible()
    page.get_by_role("spinbutton", name="Generation length").fill("48")
    page.get_by_role("spinbutton", name="Steps", exact=True).fill("48")
    page.get_by_role("button", name="Compare", exact=True).click()
    expect(page.get_by_text("Final tokens compared with the dense model's")).to_be_visible()
    idle(page)
    texts = page.locator("[data-testid='sinkscope-generation']")
    expect(texts).to_have_count(2)
    for i in range(2):
        box = texts.nth(i)
        content = box.text_content()
        assert "␣" not in content and " " in content, content
        assert box.evaluate("e => getComputedStyle(e).wordBreak") == "normal"
        assert box.evaluate("e => getComputedStyle(e).whiteSpace") == "pre-wrap"
        # every line break falls at a space or newline: no word is split between two lines
        broken = box.evaluate("""e => {
            const r = document.createRange(), t = e.innerText, out = [];
            const walker = document.createTreeWalker(e, NodeFilter.SHOW_TEXT);
            let prev = null, prevTop = null;
            for (let n = walker.nextNode(); n; n = walker.nextNode()) {
              for (let i = 0; i < n.length; i++) {
                r.setStart(n, i); r.setEnd(n, i + 1);
                const rect = r.getClientRects()[0];
                if (!rect) continue;
                const ch = n.data[i];
                if (prevTop !== null && rect.top > prevTop + 4 && /\\S/.test(ch) && prev && /\\S/.test(prev)) out.push(prev + ch);
                prev = ch; prevTop = rect.top;
              }
            }
            return out;
        }""")
        assert broken == [], f"words split across lines: {broken}"
    shots(page, "compare")
    no_streamlit_exception(page)
