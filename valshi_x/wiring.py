"""The composition root's factories: the run's outside resources, opened from the settings, in order.

The adapters (valshi_x/kalshi/, valshi_x/x/) take plain arguments and never read `Settings`; this module is
where the settings become those arguments. `open_resources` opens what a run talks to (the state store, Kalshi
REST with the title lookup, the X transport and the poster) on the caller's exit stack, so they close in reverse
order however the run ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from valshi_x.config import Settings
from valshi_x.errors import ConfigError
from valshi_x.kalshi.rest import KalshiRest, TitleLookup
from valshi_x.runmode import ModeProfile, Tuning
from valshi_x.store import MODE_CHECKPOINT, Store
from valshi_x.x.filters import PostFilter
from valshi_x.x.poster import DryRunTransport, Poster, Render, Transport, XTransport, post_renderer

if TYPE_CHECKING:  # the live side's libraries load only when a live run starts: a replay needs none (issue 11)
    from pathlib import Path

    from aiohttp.client_middlewares import ClientMiddlewareType

    from valshi_x.x.poster import LookupLabel, PeekLabel


@dataclass(frozen=True, slots=True)
class Resources:
    """What a run talks to outside the process, open until the run's exit stack closes."""

    store: Store
    rest: KalshiRest | None  # None: a replay that looks up no titles talks to Kalshi not at all
    titles: TitleLookup  # looks nothing up without `rest`, or when titles are off
    poster: Poster


async def open_resources(
    resources: AsyncExitStack,
    settings: Settings,
    mode: ModeProfile,
    tuning: Tuning,
    *,
    store_path: Path | None,
    state_dir: Path,
    dry_run: bool,
    x_middlewares: Sequence[ClientMiddlewareType] = (),
) -> Resources:
    """Open the store (checked to be a dry run's or a poster's), Kalshi REST, the title lookup and the poster."""
    store = await Store.open(store_path, dry_run=dry_run)
    resources.push_async_callback(store.close)
    await check_store_mode(store, dry_run=dry_run, state_dir=state_dir)
    rest: KalshiRest | None = None
    if mode.recovery or mode.lookup_titles:
        http = _http_session()
        resources.push_async_callback(http.close)
        rest = KalshiRest(
            http,
            settings.kalshi_api_url,
            pause_initial_s=tuning.rest_pause_initial_s,
            pause_max_s=tuning.rest_pause_max_s,
        )
    titles = TitleLookup(rest if mode.lookup_titles else None)
    resources.push_async_callback(titles.aclose)
    transport = await open_transport(settings, dry_run=dry_run, middlewares=x_middlewares)
    resources.push_async_callback(transport.close)
    overrides: dict[str, Any] = {}
    if dry_run:
        # A dry run posts nothing, so it spends no budget: every whale is shown as it comes.
        overrides |= {"posts_per_15min": 10**9, "posts_per_24h": 10**9}
    if not mode.max_alert_age_applies:
        overrides["max_alert_age_s"] = None
    poster = poster_from_settings(
        settings,
        store,
        transport,
        lookup_label=titles.label_for if mode.lookup_titles else None,
        peek_label=titles.cached_label if mode.lookup_titles else None,  # the filters' category, when cached
        **overrides,
    )
    return Resources(store, rest, titles, poster)


async def check_store_mode(store: Store, *, dry_run: bool, state_dir: Path) -> None:
    """A state directory is either a dry run's or a poster's, never both.

    A dry run marks whales posted and claims their trade ids; in the production outbox that would keep the
    real poster from ever posting them.
    """
    mode = "dry_run" if dry_run else "posting"
    found = await store.get_checkpoint(MODE_CHECKPOINT)
    if found is None:
        await store.set_checkpoint(MODE_CHECKPOINT, mode)
    elif found != mode:
        raise ConfigError(
            [f"--state-dir: {state_dir} holds a {found.replace('_', ' ')} outbox; use another directory for a {mode}"]
        )


async def open_transport(
    settings: Settings, *, dry_run: bool, middlewares: Sequence[ClientMiddlewareType] = ()
) -> Transport:
    """The transport the settings ask for; close it at shutdown."""
    if dry_run:
        return DryRunTransport()
    return await XTransport.open(
        consumer_key=settings.x_api_key,
        consumer_secret=settings.x_api_secret,
        access_token=settings.x_access_token,
        access_token_secret=settings.x_access_token_secret,
        timeout_s=settings.x_timeout_s,
        middlewares=middlewares,
    )


def poster_from_settings(
    settings: Settings,
    store: Store,
    transport: Transport,
    *,
    render: Render | None = None,
    lookup_label: LookupLabel | None = None,
    peek_label: PeekLabel | None = None,
    **overrides: Any,
) -> Poster:
    """A poster with the caps, the age limit, the filters and the text settings of `settings`; `overrides` win."""
    kwargs: dict[str, Any] = {
        "posts_per_15min": settings.x_posts_per_15min,
        "posts_per_24h": settings.x_posts_per_24h,
        "max_alert_age_s": settings.max_alert_age_s,
        "post_filter": PostFilter.of(
            post_categories=settings.post_categories,
            skip_categories=settings.skip_categories,
            post_series=settings.post_series,
            skip_series=settings.skip_series,
            post_combos=settings.post_combos,
        ),
        **overrides,
    }
    if render is None:
        render = post_renderer(settings.post_template, post_links=settings.post_links)
    return Poster(store, transport, render=render, lookup_label=lookup_label, peek_label=peek_label, **kwargs)


def _http_session() -> Any:
    """An aiohttp session for Kalshi REST; aiohttp is imported here, so a replay without titles never loads it."""
    import aiohttp  # noqa: PLC0415

    return aiohttp.ClientSession()
