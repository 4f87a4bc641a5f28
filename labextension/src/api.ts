/**
 * The cluster REST API of jupyter-px's server extension (jupyter_ext/serverextension.py).
 *
 * Every request goes through ServerConnection, which adds the token and the XSRF header
 * of the page's server settings. A reply that is not OK becomes an ApiError carrying the
 * server's own `message` (the extension answers errors as `{"message": ...}`).
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/** What a cluster is or what a request is doing to it. */
export type ClusterState = 'running' | 'stopped' | 'starting' | 'scaling' | 'stopping';

/** The JSON model of one cluster, as the server extension sends it. */
export interface IClusterModel {
  id: string;
  state: ClusterState;
  n: number | null;
  controller: { pid: number } | null;
  engines: { n: number; ids: number[]; pids: { [id: string]: number | null } };
}

/** Raised when the server answers a request with an error status. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string
  ) {
    super(message);
    this.name = 'ApiError';
  }
}

const ROUTE = 'jupyter-px/clusters';

/** A client of the cluster API of one Jupyter server. */
export class ClusterApi {
  constructor(readonly settings: ServerConnection.ISettings) {}

  /** Every cluster the server knows, running ones first. */
  list(): Promise<IClusterModel[]> {
    return this._request('', 'GET');
  }

  /** A new (stopped) cluster with `n` engines. */
  create(n: number): Promise<IClusterModel> {
    return this._request('', 'POST', { n });
  }

  /** Start a stopped cluster with `n` engines. */
  start(id: string, n: number): Promise<IClusterModel> {
    return this._request(id, 'POST', { n });
  }

  /** Scale a running cluster to `n` engines. */
  scale(id: string, n: number): Promise<IClusterModel> {
    return this._request(id, 'POST', { n });
  }

  /** Stop a cluster (controller and engines) and forget it. */
  async stop(id: string): Promise<void> {
    await this._request(id, 'DELETE');
  }

  private async _request<T>(id: string, method: string, body?: object): Promise<T> {
    const parts = [this.settings.baseUrl, ROUTE];
    if (id) {
      parts.push(encodeURIComponent(id));
    }
    const init: RequestInit = { method };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
    }
    let response: Response;
    try {
      response = await ServerConnection.makeRequest(URLExt.join(...parts), init, this.settings);
    } catch (error) {
      throw new ApiError(0, `the Jupyter server did not answer: ${String(error)}`);
    }
    const text = await response.text();
    let data: any = null;
    if (text) {
      try {
        data = JSON.parse(text);
      } catch {
        data = null;
      }
    }
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      if (data && typeof data.message === 'string') {
        message = data.message;
      } else if (response.status === 404) {
        message +=
          ': the jupyter-px server extension does not answer here; ' +
          'enable it with `jupyter px install --sys-prefix` and restart JupyterLab';
      }
      throw new ApiError(response.status, message);
    }
    return data as T;
  }
}
