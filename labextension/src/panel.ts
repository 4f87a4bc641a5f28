/**
 * The "Clusters" sidebar: the server's clusters, refreshed every few seconds while the
 * panel is shown, with controls to create, start, scale and stop them.
 *
 * Rows are kept by cluster id and updated in place, so a refresh never loses an engine
 * count being typed. An error from the API is shown where it happened: in the cluster's
 * row, or at the top of the panel for listing and creating.
 */
import { refreshIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

import { ClusterApi, IClusterModel } from './api';
import { clusterIcon } from './icon';

/** How often the list is refreshed while the panel is visible (milliseconds). */
export const REFRESH_INTERVAL = 3000;

const DEFAULT_ENGINES = 2;

/** What the panel asks of its host. */
export interface IClustersPanelOptions {
  api: ClusterApi;
  /** Insert the client code of a running cluster into the current notebook. */
  insertClientCode: (id: string, n: number) => Promise<void>;
}

function element<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className: string,
  text?: string
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  node.className = className;
  if (text !== undefined) {
    node.textContent = text;
  }
  return node;
}

function button(label: string, className: string, title: string): HTMLButtonElement {
  const node = element('button', `jp-px-Button ${className}`, label);
  node.type = 'button';
  node.title = title;
  return node;
}

function engineInput(className: string, label: string): HTMLInputElement {
  const node = element('input', `jp-px-EngineInput ${className}`);
  node.type = 'number';
  node.min = '0';
  node.step = '1';
  node.setAttribute('aria-label', label);
  return node;
}

/** The engine count typed in `input`, or an error message. */
function readCount(input: HTMLInputElement): number | string {
  const text = input.value.trim();
  // the server checks the range and says what it accepts; here only "is it an integer"
  if (!/^-?\d+$/.test(text)) {
    // a number input's value is empty for anything but a number
    return 'Type the number of engines (a whole number).';
  }
  return Number(text);
}

/** An error's message: an ApiError's is the server's own. */
function describe(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

function showError(node: HTMLElement, message: string): void {
  node.textContent = message;
  node.hidden = !message;
}

/** One cluster's row: its facts, its controls and its last error. */
class ClusterRow {
  readonly node = element('li', 'jp-px-Cluster');
  model: IClusterModel;

  constructor(
    model: IClusterModel,
    private readonly _panel: ClustersPanel
  ) {
    this.model = model;
    this.node.dataset.clusterId = model.id;
    this._id.title = model.id;
    const facts = element('div', 'jp-px-Cluster-facts');
    const state = element('span', 'jp-px-Cluster-value');
    state.append(this._state);
    facts.append(
      element('span', 'jp-px-Cluster-label', 'State'),
      state,
      element('span', 'jp-px-Cluster-label', 'Engines'),
      this._engines,
      element('span', 'jp-px-Cluster-label', 'Controller PID'),
      this._pid
    );
    const actions = element('div', 'jp-px-Cluster-actions');
    actions.append(this._count, this._primary, this._stop);
    this._error.hidden = true;
    this._error.setAttribute('role', 'alert');
    this.node.append(this._id, facts, actions, this._insert, this._error);
    this._count.addEventListener('input', () => {
      this._edited = true;
    });
    this._count.addEventListener('keydown', event => {
      if (event.key === 'Enter') {
        void this._startOrScale();
      }
    });
    this._primary.addEventListener('click', () => void this._startOrScale());
    this._stop.addEventListener('click', () => void this._doStop());
    this._insert.addEventListener('click', () => void this._doInsert());
    this.update(model);
  }

  /** Show a newer model of this cluster. */
  update(model: IClusterModel): void {
    this.model = model;
    const running = model.state === 'running';
    const settled = running || model.state === 'stopped';
    this.node.dataset.state = model.state;
    this._id.textContent = model.id;
    this._state.textContent = this._doing ?? model.state;
    this._state.dataset.state = this._doing ? 'busy' : settled ? model.state : 'busy';
    this._engines.textContent = String(model.engines.n);
    this._pid.textContent = model.controller ? String(model.controller.pid) : '—';
    if (!this._edited) {
      this._count.value = String(running ? model.engines.n : model.n ?? DEFAULT_ENGINES);
    }
    this._primary.textContent = running ? 'Scale' : 'Start';
    this._primary.title = running
      ? 'Start or stop engines to have this many'
      : 'Start the controller and this many engines';
    this._stop.textContent = running ? 'Stop' : 'Remove';
    this._stop.title = running
      ? 'Stop the engines and the controller'
      : 'Forget this stopped cluster';
    this._insert.hidden = !running;
    const disabled = this._doing !== null || !settled;
    for (const control of [this._count, this._primary, this._stop, this._insert]) {
      control.disabled = disabled;
    }
  }

  private async _startOrScale(): Promise<void> {
    const n = readCount(this._count);
    if (typeof n === 'string') {
      showError(this._error, n);
      return;
    }
    const api = this._panel.api;
    if (this.model.state === 'running') {
      await this._act('scaling', () => api.scale(this.model.id, n));
    } else {
      await this._act('starting', () => api.start(this.model.id, n));
    }
  }

  private async _doStop(): Promise<void> {
    await this._act('stopping', async () => {
      await this._panel.api.stop(this.model.id);
      return 'gone';
    });
  }

  private async _doInsert(): Promise<void> {
    showError(this._error, '');
    try {
      await this._panel.insertClientCode(this.model.id, this.model.engines.n);
    } catch (error) {
      showError(this._error, describe(error));
    }
  }

  /** Run one request, showing `doing` meanwhile and its error (if any) after. */
  private async _act(
    doing: string,
    request: () => Promise<IClusterModel | 'gone'>
  ): Promise<void> {
    if (this._doing !== null) {
      return;
    }
    showError(this._error, '');
    this._doing = doing;
    this.update(this.model);
    let result: IClusterModel | 'gone' | null = null;
    try {
      result = await request();
      this._edited = false;
    } catch (error) {
      showError(this._error, describe(error));
    } finally {
      this._doing = null;
    }
    this._panel.changed(this.model.id, result);
  }

  private _doing: string | null = null;
  private _edited = false;
  private readonly _id = element('div', 'jp-px-Cluster-id');
  private readonly _state = element('span', 'jp-px-Cluster-state');
  private readonly _engines = element('span', 'jp-px-Cluster-engines');
  private readonly _pid = element('span', 'jp-px-Cluster-pid');
  private readonly _count = engineInput('jp-px-Cluster-count', 'Engine count');
  private readonly _primary = button('Start', 'jp-px-Cluster-start jp-mod-accept', '');
  private readonly _stop = button('Stop', 'jp-px-Cluster-stop jp-mod-warn', '');
  private readonly _insert = button(
    'Insert client code',
    'jp-px-Cluster-insert',
    'Add a cell connecting to this cluster to the current notebook'
  );
  private readonly _error = element('div', 'jp-px-Error');
}

/** The left-sidebar panel listing the clusters. */
export class ClustersPanel extends Widget {
  readonly api: ClusterApi;
  readonly insertClientCode: (id: string, n: number) => Promise<void>;

  constructor(options: IClustersPanelOptions) {
    super();
    this.api = options.api;
    this.insertClientCode = options.insertClientCode;
    this.id = 'jupyter-px-clusters';
    this.addClass('jp-px-ClustersPanel');
    this.title.icon = clusterIcon;
    this.title.caption = 'Clusters (jupyter-px)';

    const header = element('header', 'jp-px-Header');
    this._refreshButton.append(refreshIcon.element({ tag: 'span' }));
    this._refreshButton.setAttribute('aria-label', 'Refresh');
    header.append(element('h2', 'jp-px-Title', 'Clusters'), this._refreshButton);
    const create = element('div', 'jp-px-New');
    const label = element('label', 'jp-px-New-label', 'Engines');
    this._newCount.value = String(DEFAULT_ENGINES);
    label.append(this._newCount);
    create.append(label, this._newButton);
    this._error.hidden = true;
    this._error.setAttribute('role', 'alert');
    this._empty.hidden = true;
    this.node.append(header, create, this._error, this._list, this._empty);

    this._refreshButton.addEventListener('click', () => void this.refresh());
    this._newButton.addEventListener('click', () => void this._create());
    this._newCount.addEventListener('keydown', event => {
      if (event.key === 'Enter') {
        void this._create();
      }
    });
  }

  /** Fetch the list and show it (a newer answer of an action is never overwritten). */
  async refresh(): Promise<void> {
    if (this._refreshing) {
      // it may have been sent before a change: list again once it is back
      this._again = true;
      return this._refreshing;
    }
    const version = this._version;
    this._refreshing = (async () => {
      try {
        const models = await this.api.list();
        if (version === this._version) {
          this._show(models);
        }
        if (this._errorFrom === 'list') {
          this._setError('', null);
        }
      } catch (error) {
        this._setError(`Could not list the clusters: ${describe(error)}`, 'list');
      } finally {
        this._refreshing = null;
        if (this._again) {
          this._again = false;
          void this.refresh();
        }
      }
    })();
    return this._refreshing;
  }

  /** A row's request ended: show its answer ('gone': stopped and forgotten; null: it
   * failed, the row shows why). */
  changed(id: string, result: IClusterModel | 'gone' | null): void {
    this._version += 1;
    void this.refresh();
    const row = this._rows.get(id);
    if (!row) {
      return;
    }
    if (result === 'gone') {
      row.node.remove();
      this._rows.delete(id);
      this._empty.hidden = this._rows.size > 0;
    } else {
      row.update(result ?? row.model);
    }
  }

  dispose(): void {
    this._stopTimer();
    super.dispose();
  }

  protected onAfterAttach(): void {
    this._stopTimer();
    this._timer = window.setInterval(() => {
      if (this.isVisible && !document.hidden) {
        void this.refresh();
      }
    }, REFRESH_INTERVAL);
  }

  protected onBeforeDetach(): void {
    this._stopTimer();
  }

  protected onAfterShow(): void {
    void this.refresh();
  }

  private _stopTimer(): void {
    if (this._timer !== null) {
      window.clearInterval(this._timer);
      this._timer = null;
    }
  }

  private _show(models: IClusterModel[]): void {
    const seen = new Set<string>();
    let previous: Element | null = null;
    for (const model of models) {
      seen.add(model.id);
      let row = this._rows.get(model.id);
      if (row) {
        row.update(model);
      } else {
        row = new ClusterRow(model, this);
        this._rows.set(model.id, row);
      }
      // the server's order (running first), moving nodes only when needed
      const expected: Element | null = previous
        ? previous.nextElementSibling
        : this._list.firstElementChild;
      if (expected !== row.node) {
        this._list.insertBefore(row.node, expected);
      }
      previous = row.node;
    }
    for (const [id, row] of this._rows) {
      if (!seen.has(id)) {
        row.node.remove();
        this._rows.delete(id);
      }
    }
    this._empty.hidden = models.length > 0;
  }

  private async _create(): Promise<void> {
    const n = readCount(this._newCount);
    if (typeof n === 'string') {
      this._setError(n, 'create');
      return;
    }
    if (this._newButton.disabled) {
      return;
    }
    this._setError('', null);
    this._newButton.disabled = true;
    this._newButton.textContent = 'Creating…';
    try {
      const model = await this.api.create(n);
      this._version += 1;
      const row = new ClusterRow(model, this);
      this._rows.set(model.id, row);
      this._list.append(row.node);
      this._empty.hidden = true;
    } catch (error) {
      this._setError(`Could not create a cluster: ${describe(error)}`, 'create');
    } finally {
      this._newButton.disabled = false;
      this._newButton.textContent = 'New cluster';
    }
    void this.refresh();
  }

  private _setError(message: string, from: 'list' | 'create' | null): void {
    this._errorFrom = message ? from : null;
    showError(this._error, message);
  }

  private _rows = new Map<string, ClusterRow>();
  private _refreshing: Promise<void> | null = null;
  private _again = false;
  private _version = 0;
  private _timer: number | null = null;
  private _errorFrom: 'list' | 'create' | null = null;
  private readonly _refreshButton = button('', 'jp-px-Refresh', 'Refresh the list');
  private readonly _newCount = engineInput('jp-px-New-count', 'Engines of the new cluster');
  private readonly _newButton = button(
    'New cluster',
    'jp-px-New-button jp-mod-accept',
    'Create a stopped cluster with this many engines; Start starts it'
  );
  private readonly _error = element('div', 'jp-px-Error jp-px-Panel-error');
  private readonly _list = element('ul', 'jp-px-List');
  private readonly _empty = element(
    'p',
    'jp-px-Empty',
    'No clusters. Choose an engine count and press New cluster.'
  );
}
