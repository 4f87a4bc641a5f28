/**
 * jupyter-px's JupyterLab extension: a "Clusters" sidebar over the server extension's
 * cluster API, and a command inserting code that connects a notebook to a cluster.
 */
import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette, InputDialog, Notification } from '@jupyterlab/apputils';
import { INotebookTracker } from '@jupyterlab/notebook';

import { ClusterApi, IClusterModel } from './api';
import { clientCode, insertCodeCell } from './code';
import { ClustersPanel } from './panel';

export namespace CommandIDs {
  export const insertClientCode = 'jupyter-px:insert-client-code';
  export const showClusters = 'jupyter-px:show-clusters';
}

const CATEGORY = 'Clusters (jupyter-px)';

/** Ask which running cluster to use: null when there is none or the user cancels. */
async function chooseCluster(api: ClusterApi): Promise<IClusterModel | null> {
  const running = (await api.list()).filter(c => c.state === 'running');
  if (running.length === 0) {
    Notification.warning('No running cluster: start one in the Clusters panel first.', {
      autoClose: 5000
    });
    return null;
  }
  if (running.length === 1) {
    return running[0];
  }
  const labels = running.map(c => `${c.id} (${c.engines.n} engines)`);
  const answer = await InputDialog.getItem({
    title: 'Insert client code for which cluster?',
    items: labels
  });
  if (!answer.button.accept || answer.value === null) {
    return null;
  }
  return running[labels.indexOf(answer.value)] ?? null;
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'jupyter-px:plugin',
  description: 'List, start, scale and stop jupyter-px clusters; insert client code.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ICommandPalette, ILayoutRestorer],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    palette: ICommandPalette | null,
    restorer: ILayoutRestorer | null
  ) => {
    const api = new ClusterApi(app.serviceManager.serverSettings);

    const insert = async (id: string, n: number): Promise<void> => {
      if (!insertCodeCell(tracker, clientCode(id, n))) {
        throw new Error('Open a notebook first: the client code goes into the current one.');
      }
      const current = tracker.currentWidget;
      if (current) {
        app.shell.activateById(current.id);
      }
    };

    const panel = new ClustersPanel({ api, insertClientCode: insert });
    app.shell.add(panel, 'left', { rank: 1000, type: 'Clusters' });
    restorer?.add(panel, panel.id);

    app.commands.addCommand(CommandIDs.insertClientCode, {
      label: 'Insert Cluster Client Code',
      caption: 'Add a cell connecting to a running jupyter-px cluster to the current notebook',
      isEnabled: () => tracker.currentWidget !== null,
      execute: async args => {
        try {
          let id = typeof args.id === 'string' ? args.id : null;
          let n = typeof args.n === 'number' ? args.n : null;
          if (id === null || n === null) {
            const chosen = await chooseCluster(api);
            if (!chosen) {
              return;
            }
            id = chosen.id;
            n = chosen.engines.n;
          }
          await insert(id, n);
        } catch (error) {
          Notification.error(`Insert client code: ${(error as Error).message ?? error}`, {
            autoClose: 8000
          });
        }
      }
    });
    app.commands.addCommand(CommandIDs.showClusters, {
      label: 'Show Clusters Panel',
      execute: () => app.shell.activateById(panel.id)
    });
    if (palette) {
      palette.addItem({ command: CommandIDs.insertClientCode, category: CATEGORY });
      palette.addItem({ command: CommandIDs.showClusters, category: CATEGORY });
    }
  }
};

export default plugin;
